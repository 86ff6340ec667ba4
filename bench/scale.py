def dispatcher_scale(t,q): pass
