"""What a peer's text may and may not do to a terminal (ci/sanitize.py)."""

from __future__ import annotations

import re

from hypothesis import given, settings, strategies as st

from ci.sanitize import log_text, plain

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
HOSTILE = [
    "\x1b]52;c;cm0gLXJmIH4=\x07",          # OSC 52: write the clipboard
    "\x1b[2J\x1b[H",                       # clear the screen, cursor home
    "\x1b[1A\x1b[2K=== passed ===",        # rewrite the line above
    "\x1b]0;owned\x1b\\",                  # window title
    "\x9b2J",                              # CSI as one C1 character
    "\u202eexe.txt",                       # right-to-left override
    "\x1bP+q544e\x1b\\",                   # DCS request
]


def test_plain_leaves_no_control_character_and_keeps_the_words():
    for text in HOSTILE:
        assert not CONTROL.search(plain("subject " + text + " end"))
    assert plain("fix\tthe\nbug \x1b[31mnow\x1b[0m") == "fix the bug now"


def test_a_log_keeps_lines_tabs_and_only_colour():
    text = "step 1\r\n\tok\n" + "".join(HOSTILE) + "\x1b[31mred\x1b[0m\n"
    coloured = log_text(text, keep_colour=True)
    assert "\x1b[31mred\x1b[0m" in coloured
    assert not CONTROL.search(re.sub(r"\x1b\[[0-9;]*m", "", coloured).replace("\n", "").replace("\t", ""))
    bare = log_text(text)
    assert "\x1b" not in bare and bare.startswith("step 1\n\tok\n")


def test_a_carriage_return_cannot_rewrite_a_line():
    assert log_text("FAILED\r=== passed ===") == "FAILED\n=== passed ==="


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x2100)))
def test_nothing_survives_but_text(text):
    assert not CONTROL.search(plain(text))
    assert not CONTROL.search(log_text(text).replace("\n", "").replace("\t", ""))
    kept = log_text(text, keep_colour=True)
    assert not CONTROL.search(re.sub(r"\x1b\[[0-9;]*m", "", kept).replace("\n", "").replace("\t", ""))
