"""tinyci's benchmarks: ``python -m bench [--quick] [SCENARIO...]``.

Each scenario starts the real daemons as a user would, on loopback in a temp
dir, measures, and returns its figures; ``__main__`` prints them as a table
and writes ``bench/results/<scenario>.json``. See docs/BENCHMARKS.md.
"""
