"""What a peer's text may and may not do to a terminal (ci/sanitize.py)."""

from __future__ import annotations

import re

from hypothesis import given, settings, strategies as st

from ci.sanitize import HOLD, LogStream, log_text, plain

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


SGR = re.compile(r"\x1b\[([0-9;]*)m")


def test_colour_is_kept_but_never_conceals_and_ends_with_its_line():
    text = "\x1b[8mhidden\x1b[5mblink\x1b[38;5;196mred\x1b[48;2;0;0;0mblack\n=== failed ===\n"
    out = log_text(text, keep_colour=True)
    assert out == "hiddenblink\x1b[38;5;196mred\x1b[48;2;0;0;0mblack\x1b[0m\n=== failed ===\n"
    # a line that reset its colour itself gets no second reset; a colour left on at the end is reset
    assert log_text("\x1b[1;31mx\x1b[0m\ny\x1b[32mz", keep_colour=True) == "\x1b[1;31mx\x1b[0m\ny\x1b[32mz\x1b[0m"
    # malformed or huge parameters keep nothing that could be misread
    assert log_text("\x1b[38;5mx\x1b[38;2;1;2;300my\x1b[" + "9" * 5000 + "mz", keep_colour=True) == "xyz"


def test_a_log_in_pieces_reads_as_the_whole_log():
    text = "ok\r\n" + "".join(HOSTILE) + "\x1b[31mred\x1b[0m\r\nbar 10%\rbar 100%\n"
    for keep in (False, True):
        whole = log_text(text, keep_colour=keep)
        for cut in range(len(text) + 1):
            stream = LogStream(keep)
            assert stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.end() == whole, (keep, cut)


def test_an_unfinished_sequence_is_held_only_so_long():
    stream = LogStream()
    assert stream.feed("a\x1b]52;c;") == "a"                   # may still end with BEL: held
    assert stream.feed("x" * HOLD) == ""                      # swallowed, as a terminal would
    assert stream.feed("tail\x07b") == "tail" + "b"            # its rest is plain text; nothing is lost twice
    assert stream.end() == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="\x1b[]P\\\x07\r\n;0123458m:a \x9b\x9d\x9c"), st.integers(min_value=0, max_value=60),
       st.booleans())
def test_any_cut_gives_what_the_whole_gives(text, cut, keep):
    stream = LogStream(keep)
    pieces = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.end()
    assert pieces == log_text(text, keep_colour=keep)
    for params in SGR.findall(pieces):
        assert not {"5", "8"} & set(sgr_codes(params))         # never blink, never conceal


def sgr_codes(params: str) -> list[str]:
    """The codes of an SGR, without the arguments of 38/48 (colours)."""
    codes, out, i = params.split(";"), [], 0
    while i < len(codes):
        if codes[i] in ("38", "48"):
            i += 3 if codes[i + 1] == "5" else 5
            continue
        out.append(codes[i])
        i += 1
    return out


def test_plain_leaves_no_markup_to_parse_but_keeps_its_text():
    assert plain("[link=file:///etc/passwd]x") == "[link=file:///etc/passwd]x"   # rich Text shows it as is


def test_an_unterminated_string_takes_only_the_rest_of_its_line():
    # a terminal would swallow all that follows; the dispatcher's verdict must still show
    assert log_text("FAILED \x1b]0;title\n=== failed (exit 1) ===\n") == "FAILED \n=== failed (exit 1) ===\n"
    assert log_text("x\x9d8;;file:///etc/passwd\r\n=== failed ===") == "x\n=== failed ==="


def test_plain_returns_printable_text_as_it_is_because_nothing_it_removes_is_printable():
    """``plain`` hands printable text back untouched (the fast way, taken for
    nearly every daemon log record): sound only while no character it removes,
    and none that begins a sequence, is printable."""
    from ci import sanitize
    for code in range(0x30000):
        c = chr(code)
        if 0xD800 <= code < 0xE000 or not c.isprintable():
            continue
        assert not sanitize._ALL_CONTROLS.search(c), hex(code)
        for rest in ("[0m", "]0;title\x07", "P1\x1b\\", "x", ""):
            assert not sanitize._SEQUENCES.match(c + rest), hex(code)
    assert plain("build 12 attempt 1 -> fake-3") == "build 12 attempt 1 -> fake-3"
    assert plain("evil\u202eexe.txt \x1b[2Jx") == "evilexe.txt x"
