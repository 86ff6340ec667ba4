"""`python -m ci.web ...` is `tinyci web ...` (how `tinyci up` starts it)."""

import sys

from ci.cli import main

sys.exit(main(["web", *sys.argv[1:]]))
