"""What the pages show, worded and formatted once: the Jinja environment
(autoescape on for every template: everything from a peer is text), and the
filters the templates use for times, durations, statuses and links."""

from __future__ import annotations

import datetime
import time
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined

from .. import reports

STATUS_WORDS = {"passed": "passed", "failed": "failed", "error": "error", "running": "running",
                "queued": "queued", "cancelled": "cancelled", "skipped": "skipped"}


def age(ts: float | None, now: float | None = None) -> str:
    """How long ago, in the largest whole unit that reads well: 4s, 12m, 3h, 2d."""
    if not ts:
        return "-"
    seconds = max(0.0, (now or time.time()) - ts)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m ago"
    if seconds < 86400 * 2:
        return f"{seconds // 3600:.0f}h ago"
    return f"{seconds // 86400:.0f}d ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m {seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h {seconds % 3600 // 60:02.0f}m"


def iso(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds")


def clock(ts: float | None) -> str:
    """A moment as people read it on a build page: UTC, to the second."""
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def short(sha: str | None) -> str:
    return (sha or "")[:8]


def path_part(text: str) -> str:
    """``text`` as one or more URL path segments (a branch may hold slashes)."""
    return quote(text, safe="/")


def query(params: dict, **changes) -> str:
    """A query string of ``params`` with ``changes``; empty values left out."""
    merged = {**params, **changes}
    pairs = [(k, v) for k, v in merged.items() if v not in (None, "")]
    return "?" + urlencode(pairs) if pairs else ""


def person(author: str) -> str:
    """The name of "Name <email>" (the whole text when it has no e-mail part)."""
    name, sep, _ = author.partition(" <")
    return name if sep and name else author


def label_list(labels) -> str:
    return ", ".join(labels) if labels else "-"


def test_counts(tests: dict | None) -> str:
    """"1991 passed, 2 failed" for a build's JUnit reports ("" without)."""
    return reports.summary(tests) if isinstance(tests, dict) else ""


def environment() -> Environment:
    env = Environment(loader=PackageLoader("ci.web", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(age=age, duration=duration, iso=iso, clock=clock, short=short, path=path_part,
                       labels=label_list, person=person, tests=test_counts)
    env.globals.update(query=query, STATUS_WORDS=STATUS_WORDS)
    return env
