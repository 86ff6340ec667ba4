"""Text a peer sent, made safe for a terminal or a daemon's own log.

Builds print anything, and commit subjects, branch names, runner names and
hosts come from whoever holds a secret. Written raw to a terminal, an escape
sequence can clear the screen, rewrite a line into a fake verdict, set the
window title or write the clipboard (OSC 52); a bidi override can make text
read differently from what it is. So everything from a peer passes through
here before it reaches a terminal: control characters (C0 and C1), escape
sequences and bidi controls are removed; a log keeps its newlines and tabs,
and its colours (SGR) only when the caller renders them safely.
"""

from __future__ import annotations

import re

# ESC-introduced sequences: CSI (ESC [ ... final), OSC/DCS/SOS/PM/APC strings
# (ESC ] ... BEL or ST), and two-character escapes. Unterminated strings run
# to the end of the text, as a terminal would swallow them.
_CSI = r"\x1b\[[0-?]*[ -/]*[@-~]"
_STRING = r"\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\|\Z)"
_ESC2 = r"\x1b[ -~]?"
# the same as single C1 characters (U+009B is CSI, U+009D is OSC ...)
_C1_STRING = r"[\x90\x98\x9d\x9e\x9f][^\x07\x9c\x1b]*(?:\x07|\x9c|\Z)"
_C1_CSI = r"\x9b[0-?]*[ -/]*[@-~]"
_BIDI = "\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c"
_SEQUENCES = re.compile("|".join((_CSI, _STRING, _C1_STRING, _C1_CSI, _ESC2)))
_SGR_SPLIT = re.compile(r"(\x1b\[[0-9;]*m)")
# every control character but newline and tab; C1; bidi controls
_LOG_CONTROLS = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_BIDI}]")
_ALL_CONTROLS = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{_BIDI}]")


def plain(text: str) -> str:
    """One line of plain text for a table cell, a status line or a log
    message: sequences and controls removed, newlines and tabs made spaces."""
    text = _SEQUENCES.sub("", text)
    return _ALL_CONTROLS.sub(lambda m: " " if m.group() in "\n\t\r" else "", text)


def log_text(text: str, keep_colour: bool = False) -> str:
    """Build log text for a terminal: newlines and tabs kept, a carriage
    return that does not end a line becomes a newline (so a line cannot be
    rewritten into another), everything else that moves the cursor removed.
    With ``keep_colour``, SGR colour sequences stay."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if keep_colour:
        # each stretch between SGR sequences cleaned on its own; the SGRs kept
        parts = _SGR_SPLIT.split(text)
        return "".join(part if n % 2 else _clean_log(part) for n, part in enumerate(parts))
    return _clean_log(text)


def _clean_log(text: str) -> str:
    return _LOG_CONTROLS.sub("", _SEQUENCES.sub("", text))
