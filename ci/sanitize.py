"""Text a peer sent, made safe for a terminal or a daemon's own log.

Builds print anything, and commit subjects, branch names, runner names and
hosts come from whoever holds a secret. Written raw to a terminal, an escape
sequence can clear the screen, rewrite a line into a fake verdict, set the
window title or write the clipboard (OSC 52); a bidi override can make text
read differently from what it is. So everything from a peer passes through
here before it reaches a terminal: control characters (C0 and C1), escape
sequences and bidi controls are removed; a log keeps its newlines and tabs,
and its colours (SGR) only when the caller renders them safely.

``plain`` is for one line (a table cell, a message, a daemon's log record);
``log_text`` for a whole log; ``LogStream`` for a log that arrives in pieces.
"""

from __future__ import annotations

import functools
import re

# ESC-introduced sequences: CSI (ESC [ ... final), OSC/DCS/SOS/PM/APC strings
# (ESC ] ... BEL or ST), and two-character escapes. An unterminated string is
# removed to the end of its line, no further: a terminal would swallow the
# rest, but here it must not take the lines after it (the dispatcher's) along.
# A string's body also ends at the introducer of another sequence, so that no
# sequence holds another (see _complete).
_CSI = r"\x1b\[[0-?]*[ -/]*[@-~]"
_BODY = r"[^\x07\x1b\x90\x98\x9b-\x9f\r\n]*"
_STRING = rf"\x1b[\]PX^_]{_BODY}(?:\x07|\x1b\\|\x9c)?"
_ESC2 = r"\x1b[ -~]?"
# the same as single C1 characters (U+009B is CSI, U+009D is OSC ...)
_C1_STRING = rf"[\x90\x98\x9d\x9e\x9f]{_BODY}(?:\x07|\x1b\\|\x9c)?"
_C1_CSI = r"\x9b[0-?]*[ -/]*[@-~]"
_BIDI = "\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c"
_SEQUENCES = re.compile("|".join((_CSI, _STRING, _C1_STRING, _C1_CSI, _ESC2)))
# every control character but newline and tab; C1; bidi controls
_LOG_CONTROLS = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_BIDI}]")
_ALL_CONTROLS = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{_BIDI}]")

# SGR (ESC [ params m), split out with its parameters when colour is kept.
_SGR = re.compile(r"\x1b\[([0-9;]*)m")
# The SGR codes a log may keep: reset, bold, dim, italic, underline, reverse,
# strike-through, their undoing, and colours. Not conceal (8), which could
# hide the dispatcher's own lines, nor blink; 38/48 (256 or RGB colours) are
# read with their arguments.
_SAFE_SGR = frozenset({0, 1, 2, 3, 4, 7, 9, 21, 22, 23, 24, 27, 29, 39, 49, *range(30, 38),
                       *range(40, 48), *range(90, 98), *range(100, 108)})
RESET = "\x1b[0m"
# What may be the start of a sequence cut off by the end of a piece of a log:
# an introducer and whatever may follow it before the sequence is complete.
_INTRODUCERS = "\x1b\x9b\x90\x98\x9d\x9e\x9f"
_PARTIAL = re.compile(rf"\x1b(?:\[[0-?]*[ -/]*|[\]PX^_]{_BODY})?|\x9b[0-?]*[ -/]*|[\x90\x98\x9d\x9e\x9f]{_BODY}")
# A longer unfinished sequence is not held back: cleaned as it is, the rest of
# it shows as harmless text when it comes.
HOLD = 4096


def plain(text: str) -> str:
    """One line of plain text for a table cell, a status line or a log
    message: sequences and controls removed, newlines and tabs made spaces."""
    if text.isprintable():      # every sequence and control is a character that is not: nothing to remove
        return text
    text = _SEQUENCES.sub("", text)
    return _ALL_CONTROLS.sub(lambda m: " " if m.group() in "\n\t\r" else "", text)


def log_text(text: str, keep_colour: bool = False) -> str:
    """Build log text for a terminal: newlines and tabs kept, a carriage
    return that does not end a line becomes a newline (so a line cannot be
    rewritten into another), everything else that moves the cursor removed.
    With ``keep_colour``, SGR colour sequences stay (see ``LogStream``)."""
    stream = LogStream(keep_colour)
    return stream.feed(text) + stream.end()


class LogStream:
    """``log_text`` for a log that arrives in pieces: ``feed`` each piece, then
    ``end``. A sequence or a CR LF cut in two by the end of a piece is held back
    until its rest comes. With ``keep_colour``, only the SGR codes in
    ``_SAFE_SGR`` are kept, and a line that leaves a colour on is reset at its
    end, so a build's colours can neither leak into nor hide the lines after
    it (the dispatcher's own lines always start a line)."""

    def __init__(self, keep_colour: bool = False):
        self.keep_colour = keep_colour
        self.held = ""
        self.coloured = False           # an SGR this line set is still in force

    def feed(self, text: str) -> str:
        text = self.held + text
        cut = _complete(text)
        self.held = text[cut:]
        return self._clean(text[:cut])

    def end(self) -> str:
        """What was held back, cleaned as it is; a colour still on is reset."""
        text, self.held = self.held, ""
        out = self._clean(text)
        if self.coloured:
            out += RESET
            self.coloured = False
        return out

    def _clean(self, text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not self.keep_colour:
            return _clean_log(text)
        out = []
        # split with its group: text, SGR parameters, text, SGR parameters, ...
        for n, part in enumerate(_SGR.split(text)):
            if n % 2:
                out.append(self._sgr(part))
                continue
            part = _clean_log(part)
            if self.coloured and "\n" in part:
                part = part.replace("\n", RESET + "\n", 1)
                self.coloured = False
            out.append(part)
        return "".join(out)

    def _sgr(self, params: str) -> str:
        sequence, coloured = _safe_sgr(params)
        if coloured is not None:
            self.coloured = coloured
        return sequence


@functools.lru_cache(maxsize=256)       # a log repeats a few colours many times
def _safe_sgr(params: str) -> tuple[str, bool | None]:
    """The safe codes of one SGR sequence, as a sequence again ('' if none),
    and whether a colour is on after it (None: it changes nothing)."""
    codes = params.split(";")
    kept: list[str] = []
    coloured = None
    i = 0
    while i < len(codes):
        # an empty code is 0; a long one is no code we keep (and int() would refuse 5000 digits)
        code = int(codes[i] or 0) if len(codes[i]) <= 3 else -1
        if code in (38, 48):
            args = {"5": 1, "2": 3}.get(codes[i + 1] if i + 1 < len(codes) else "")
            colour = codes[i + 2:i + 2 + args] if args else []
            if not args or len(colour) < args or not all(c.isdigit() and len(c) <= 3 and int(c) < 256
                                                         for c in colour):
                break               # a malformed colour: what follows it cannot be read either
            kept += [str(code), codes[i + 1], *(str(int(c)) for c in colour)]
            coloured = True
            i += 2 + args
            continue
        if code in _SAFE_SGR:
            kept.append(str(code))
            coloured = code != 0
        i += 1
    return (f"\x1b[{';'.join(kept)}m" if kept else ""), coloured


def _complete(text: str) -> int:
    """Where the part of ``text`` that can be cleaned now ends: before a final
    CR (a CR LF may be cut in two) or an unfinished sequence. No sequence
    holds an introducer but at its start (or in its closing ESC \\), so an
    unfinished one starts at the last introducer."""
    if text.endswith("\r"):
        return len(text) - 1
    start = max(text.rfind(c, max(0, len(text) - HOLD)) for c in _INTRODUCERS)
    if start >= 0 and _PARTIAL.fullmatch(text, start):
        return start
    return len(text)


def _clean_log(text: str) -> str:
    return _LOG_CONTROLS.sub("", _SEQUENCES.sub("", text))
