"""Build log text as HTML lines: every line numbered and linkable (``#L120``),
colours kept and everything else a build printed made harmless.

Each line first goes through ``sanitize.log_text(keep_colour=True)`` (no
cursor movement, no OSC, no C1, a stray carriage return shown as a break
instead of rewriting the line), then its SGR colour sequences become
``<span class="...">`` and all text is escaped. The colour state carries
across lines, as in a terminal, and across the chunks of a followed log
(``LogRenderer`` keeps the last partial line until its newline comes).
"""

from __future__ import annotations

import re

from markupsafe import Markup, escape

from ..sanitize import log_text

_SGR = re.compile(r"\x1b\[([0-9;]*)m")
# anything sanitize.log_text would change (controls, C1, bidi): a line without any is shown as it is
_SPECIAL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


class Style:
    """The SGR attributes in force: foreground and background colour numbers
    (0-15), bold, dim, italic, underline."""

    def __init__(self) -> None:
        self.fg: int | None = None
        self.bg: int | None = None
        self.flags: set[str] = set()
        self.css = ""                   # ``classes()``, kept: asked for every piece of text

    def apply(self, params: str) -> None:
        codes = [int(p) if p.isdigit() else 0 for p in params.split(";")] if params else [0]
        i = 0
        while i < len(codes):
            code = codes[i]
            if code == 0:
                self.fg = self.bg = None
                self.flags = set()
            elif code in (1, 2, 3, 4):
                self.flags.add("bdiu"[code - 1])
            elif code == 22:
                self.flags -= {"b", "d"}
            elif code in (23, 24):
                self.flags.discard("iu"[code - 23])
            elif 30 <= code <= 37 or 90 <= code <= 97:
                self.fg = code - 30 if code < 90 else code - 82
            elif 40 <= code <= 47 or 100 <= code <= 107:
                self.bg = code - 40 if code < 100 else code - 92
            elif code == 39:
                self.fg = None
            elif code == 49:
                self.bg = None
            elif code in (38, 48):          # 256-colour and true colour: skipped, not shown
                i += 2 if codes[i + 1:i + 2] == [5] else 4
            i += 1
        self.css = self.classes()

    def classes(self) -> str:
        names = sorted(self.flags)
        if self.fg is not None:
            names.append(f"f{self.fg}")
        if self.bg is not None:
            names.append(f"g{self.bg}")
        return " ".join(names)


def render_text(text: str, style: Style) -> str:
    """One line's text (no newline) as escaped HTML with its colour spans; ``style`` moves on.
    Plain string building: ``Markup.format`` costs ten times as much, and a page has a thousand lines."""
    if _SPECIAL.search(text) is None:       # most lines: no escape sequence at all
        return _span(text, style)
    # colours and nothing else is the next most common: no need to clean anything
    clean = text if _SPECIAL.search(_SGR.sub("", text)) is None else log_text(text, keep_colour=True)
    out, at = [], 0
    for match in _SGR.finditer(clean):
        out.append(_span(clean[at:match.start()], style))
        style.apply(match.group(1))
        at = match.end()
    out.append(_span(clean[at:], style))
    return "".join(out)


def _span(text: str, style: Style) -> str:
    if not text:
        return ""
    classes = style.css                 # our own class names: nothing from the peer
    return f'<span class="{classes}">{escape(text)}</span>' if classes else str(escape(text))


def line_html(number: int, body: str) -> str:
    """A numbered line; ``body`` is already escaped HTML."""
    return f'<div class="ln" id="L{number}"><a href="#L{number}" data-n="{number}"></a><code>{body}</code></div>\n'


class LogRenderer:
    """Turns log text, fed in any pieces, into numbered HTML lines."""

    def __init__(self, first_line: int = 1):
        self.line = first_line
        self.style = Style()
        self.partial = ""

    def feed(self, text: str) -> Markup:
        """The HTML of the lines ``text`` completes; a last line without its newline waits."""
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        return Markup("".join(self._line(line) for line in lines))

    def flush(self) -> Markup:
        """The waiting partial line, if any (the log ended without a newline)."""
        if not self.partial:
            return Markup("")
        text, self.partial = self.partial, ""
        return Markup(self._line(text))

    def _line(self, text: str) -> str:
        html = line_html(self.line, render_text(text, self.style))
        self.line += 1
        return html
