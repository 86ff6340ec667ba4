def recovery(t,q): pass
