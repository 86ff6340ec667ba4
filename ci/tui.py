"""The renderer: Rich tables and screens for `tinyci status` and the live
console. (``console`` is the loop that redraws; ``console_state`` the view
model it redraws from.)

Pure functions: they take the ``status`` snapshot dict (``{"runners":
[Runner.summary() ...], "builds": [Build.summary() ...]}``) or a
``console_state.ConsoleState``, and the current time, and return
renderables; nothing here talks to the network or reads the clock, so tests
render into a recording Console. Why a queued build waits is
``models.why_waiting``, in the same words everywhere.

Every string in a snapshot came from a peer (subjects, branches, runner
names and hosts, labels, the dispatcher's words), so every cell is a rich
``Text`` made by ``_cell``/``_line`` from ``sanitize.plain``: never a markup
string (``[link=file:///etc/passwd]`` shows as those characters) and never a
control character.
"""

from __future__ import annotations

from typing import Iterable

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import models, reports
from .sanitize import plain

RUNNER_STYLES = {"idle": "green", "busy": "yellow", "draining": "magenta", "drained": "blue", "dead": "bold red"}
BUILD_STYLES = {"queued": "cyan", "running": "yellow", "passed": "green",
                "failed": "red", "error": "bold magenta", "cancelled": "dim", "skipped": "dim"}
SUBJECT_WIDTH = 100         # a subject is cut here at most; the table cuts it further to fit
BRANCH_WIDTH = 32           # identifiers (branch, job, runner) are cut only past these, and never
NAME_WIDTH = 24             # before the subject: it is the one column that gives way


def render_status(snapshot: dict, now: float, width: int | None = None) -> RenderableType:
    """`tinyci status`: runners, builds (``width``: the terminal's, see ``render_builds``), commits."""
    runners = snapshot.get("runners", [])
    parts = [render_runners(runners, now), Text(""), render_builds(snapshot.get("builds", []), now, runners,
                                                                   width=width)]
    if snapshot.get("conditions"):
        parts[:0] = [render_conditions(snapshot["conditions"]), Text("")]
    if any(len(p.get("jobs") or []) > 1 for p in snapshot.get("pipelines") or []):
        parts += [Text(""), render_pipelines(snapshot["pipelines"])]
    return Group(*parts)


def render_conditions(conditions: Iterable[dict]) -> Text:
    """What the dispatcher is in (its disk full...), one line each: ``dispatcher: disk full (12 MB free)``."""
    text = Text()
    for i, condition in enumerate(conditions):
        text.append("\n" if i else "")
        text.append(plain(f"dispatcher: {condition.get('message') or condition.get('name', '')}"), style="bold red")
    return text


def render_pipelines(pipelines: Iterable[dict]) -> Table:
    """Each commit's status over its jobs (any error -> error; any failed -> failed; ...)."""
    table = Table(title="Commits", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  collapse_padding=True)
    table.add_column("commit", no_wrap=True)
    table.add_column("branch", max_width=24)
    table.add_column("status", no_wrap=True)
    table.add_column("jobs")
    for pipeline in pipelines:
        status = pipeline.get("status", "")
        jobs = Text()
        for job in pipeline.get("jobs") or []:
            if jobs:
                jobs.append("  ")
            jobs.append(plain(f"{job.get('job') or 'default'} #{job.get('build')} "))
            jobs.append(_status(job.get("status", "")))
        table.add_row(_sha(pipeline), _line(pipeline.get("branch", "")), _status(status), jobs)
    return table


def render_runners(runners: Iterable[dict], now: float, style: str = "", expand: bool = False) -> Table:
    """``style``: of every row ("dim" when the picture may be stale); ``expand``: fill the width."""
    runners = list(runners)
    table = Table(title="Runners", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  collapse_padding=True, expand=expand)
    table.add_column("name", no_wrap=True, max_width=NAME_WIDTH)
    table.add_column("address", no_wrap=True)
    table.add_column("labels", ratio=1 if expand else None)
    table.add_column("state", no_wrap=True)
    table.add_column("slots", justify="right", no_wrap=True)
    table.add_column("building")
    table.add_column("last seen", justify="right", no_wrap=True)
    for runner in runners:
        state = runner.get("state", "")
        running = runner.get("running") or []
        table.add_row(
            _cell(runner.get("name", "")),
            _cell(f"{runner.get('host', '')}:{runner.get('port', '')}"),
            _cell(", ".join(map(str, runner.get("labels") or [])) or "-"),
            _cell(state, RUNNER_STYLES.get(state, "")),
            _cell(f"{len(running)}/{runner.get('slots', 0)}"),
            _cell(", ".join(f"#{build}" for build in running) or "-"),
            _cell(_ago(runner.get("last_seen"), now)),
            style=style,
        )
    if not runners:
        table.caption = "no runners registered yet (start one with `tinyci runner`)"
    return table


def render_builds(builds: Iterable[dict], now: float, runners: Iterable[dict] | None = None,
                  style: str = "", expand: bool = False, clock: float | None = None,
                  width: int | None = None) -> RenderableType:
    """The builds table; given the ``runners``, a line under it says why each queued build waits.
    ``style``: of every row; ``expand``: fill the width (the subject takes the room); ``clock``:
    the time running builds are timed to (the moment the picture went stale), default ``now``;
    ``width``: the room there is, so that what must not be cut fits (``_fit``)."""
    builds = list(builds)
    took_at = now if clock is None else clock
    columns = {     # name -> the cell of each build; right-justified names in RIGHT
        "#": [_cell(b.get("id", "")) for b in builds],
        "branch": [_line(b.get("branch", "")) for b in builds],
        "commit": [_sha(b) for b in builds],
        "subject": [_subject(b) for b in builds],
        "status": [_status(b.get("status", "")) for b in builds],
        "try": [_cell(b.get("attempt", "")) for b in builds],
        # a column only where .ci.yaml has jobs
        **({"job": [_line(b.get("job") or "-") for b in builds]} if any(b.get("job") for b in builds) else {}),
        "runner": [_line(b.get("runner") or "-") for b in builds],
        # a column only where a build has JUnit reports (.ci.yaml `reports`)
        **({"tests": [_tests(b) for b in builds]} if any(b.get("tests") for b in builds) else {}),
        "took": [_cell(_took(b, took_at)) for b in builds],
        # how long ago it ended (or, not ended yet, was queued)
        "age": [_cell(_ago(b.get("finished_at") or b.get("created_at"), now)) for b in builds],
    }
    if width is not None:
        columns = _fit(columns, width)
    table = Table(title="Builds", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  collapse_padding=True, expand=expand)
    # Every column but the subject is no_wrap: rich narrows only wrappable columns
    # before it squeezes the rest, so the subject (a single-line Text with an
    # ellipsis) is what a narrow terminal cuts; number, branch, sha, job, runner stay whole.
    for name in columns:
        if name == "subject":
            table.add_column(name, ratio=1 if expand else None)
        else:
            table.add_column(name, no_wrap=True, justify="right" if name in RIGHT else "left",
                             max_width=CAPS.get(name))
    for row in zip(*columns.values()):
        table.add_row(*row, style=style)
    if not builds:
        table.caption = "no builds yet: make a commit, or `tinyci trigger`"
    known = None if runners is None else list(runners)
    waits = [f"#{b.get('id')} waits: {_why_waiting(b, known)}"
             for b in builds if known is not None and b.get("status") == "queued"]
    if waits:
        return Group(table, Text("\n".join(plain(wait) for wait in waits), style="cyan"))
    return table


RIGHT = frozenset({"#", "try", "took", "age"})
CAPS = {"branch": BRANCH_WIDTH, "job": NAME_WIDTH, "runner": NAME_WIDTH}
# Dropped in this order when the identifiers would not fit beside a readable subject
EXPENDABLE = ("try", "tests", "took", "age")
MIN_SUBJECT = 20            # what the subject should keep before a column is dropped for it
TINY_SUBJECT = 6            # below this it is left out


def _fit(columns: dict[str, list[Text]], width: int) -> dict[str, list[Text]]:
    """The columns that fit in ``width``: the expendable ones go, in EXPENDABLE's
    order, until the subject has MIN_SUBJECT; it then takes what is left, and
    goes too when that is under TINY_SUBJECT. Identifiers always stay."""
    def need(names, subject: int) -> int:
        total = 0
        for name in names:
            if name == "subject":
                total += subject
                continue
            cells = [len(cell.plain) for cell in columns[name]] + [len(name)]
            total += min(max(cells), CAPS.get(name, 10**6))
        return total + 2 * len(names)       # a column's padding and the gap to the next
    kept = list(columns)
    for name in EXPENDABLE:
        if need(kept, MIN_SUBJECT) <= width:
            break
        if name in kept:
            kept.remove(name)
    if "subject" in kept and need(kept, TINY_SUBJECT) > width:
        kept.remove("subject")
    return {name: columns[name] for name in kept}


def _subject(build: dict) -> Text:
    """The subject, after the reason for builds not started by a commit
    ("manual", "rebuild of 3")."""
    subject = truncate(plain(_first_line(build.get("subject"))), SUBJECT_WIDTH)
    reason = plain(str(build.get("reason") or "commit"))
    if reason == "commit":
        return _line(subject)
    text = Text(f"{reason}: ", style="italic", no_wrap=True, overflow="ellipsis")
    text.append(subject)
    return text


def _why_waiting(build: dict, runners: list[dict]) -> str:
    """The dispatcher's own explanation when the reply carries one (it sees every
    runner), else the same rule applied to the runners in the snapshot."""
    return build.get("waiting") or models.why_waiting(build.get("labels") or (), runners, build.get("held") or "")


def _cell(value: object, style: str = "") -> Text:
    """A table cell: plain text, never markup."""
    return Text(plain(str(value)), style=style)


def _line(value: object) -> Text:
    """A cell that stays one line, cut with an ellipsis."""
    return Text(plain(str(value)), no_wrap=True, overflow="ellipsis")


def _status(status: object) -> Text:
    return _cell(status, BUILD_STYLES.get(status, "") if isinstance(status, str) else "")


def _sha(build: dict) -> Text:
    return _cell(str(build.get("sha") or "")[:7])


def _first_line(text: object) -> str:
    """The first line of a commit message, as the subject column shows it."""
    lines = str(text or "").splitlines()
    return lines[0] if lines else ""


def truncate(text: str, width: int) -> str:
    text = text.splitlines()[0] if text else ""
    return text if len(text) <= width else text[: width - 1] + "…"


def duration(seconds: float) -> str:
    """Short human duration: 0.4s, 12s, 3m05s, 2h10m, 3d4h."""
    if seconds < 0:
        seconds = 0.0
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600}h"


def _ago(when: float | None, now: float) -> str:
    if not when:
        return "-"
    seconds = now - when
    # past a minute, seconds are noise in an age
    text = duration(seconds) if seconds < 60 else duration(seconds // 60 * 60).replace("m00s", "m")
    return text + " ago"


def _tests(build: dict) -> Text:
    """"1991 passed, 2 failed" (red when any failed), "-" without a report."""
    tests = build.get("tests")
    if not isinstance(tests, dict):
        return _cell("-")
    bad = tests.get("failed") or tests.get("errors")
    return _cell(reports.summary(tests), "red" if bad else "")


def _took(build: dict, now: float) -> str:
    if build.get("duration") is not None:
        return duration(build["duration"])
    if build.get("status") == "running" and build.get("started_at"):
        return duration(now - build["started_at"])
    return "-"


# ---------------------------------------------------------------- the live console

def render_console(state, now: float, width: int, height: int) -> RenderableType:
    """The whole ``tinyci console`` screen for a ``console_state.ConsoleState``, cut to
    ``width`` x ``height``: header, runners, queue, recent builds, and the
    followed log. The builds get every row the log does not need (the log
    keeps at least a quarter of the screen when it has that much to show);
    tables fill the width, the subject taking the room. While disconnected,
    rows are dim and running clocks stop at the moment the link was lost."""
    from rich.layout import Layout
    stale = not state.connected and state.stale_since is not None
    clock = state.stale_since if stale else now
    style = "dim" if stale else ""
    runners = sorted(state.runners.values(), key=lambda r: r["name"])
    queue = state.queue()
    header_h = 1
    shown_runners = min(len(runners), max(1, (height - 1) // 5))
    runners_h = 3 + max(shown_runners, 1) + (len(runners) > shown_runners)
    shown_queue = min(len(queue), max(1, height // 8))
    queue_h = 1 + shown_queue + (len(queue) > shown_queue)
    log_wants = 1 + len(state.log_tail(height)) if state.log_build is not None else 1
    log_min = min(max(3, height // 4), max(log_wants, 1))
    room = height - header_h - runners_h - queue_h - log_min - 3
    recent = state.recent(max(room, 0), queued=False)
    builds_h = 3 + (len(recent) or 1)
    log_h = max(height - header_h - runners_h - queue_h - builds_h, 1)

    runner_table = render_runners(runners[:shown_runners], clock, style=style, expand=True)
    if len(runners) > shown_runners:
        runner_table.caption = f"… and {len(runners) - shown_runners} more"
    runner_table.title = f"Runners ({len(runners)})"
    build_table = render_builds(recent, now, style=style, expand=True, clock=clock, width=width)
    build_table.title = "Recent builds"
    layout = Layout()
    layout.split_column(
        Layout(render_header(state, now, width), size=header_h),
        Layout(runner_table, size=runners_h),
        Layout(render_queue(state, queue[:shown_queue], len(queue), width, style), size=queue_h),
        Layout(build_table, size=builds_h),
        Layout(render_log(state, log_h - 1), size=log_h),
    )
    return layout


def render_header(state, now: float, width: int | None = None) -> Text:
    """Address, connection, then the counts; why the link is down comes last, so a
    narrow terminal cuts that rather than the counts."""
    wide = width is None or width >= 90
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append("tinyci " if wide else "", style="bold")
    text.append(plain(state.address), style="bold")
    if state.connected:
        text.append(" ● connected", style="green")
    elif state.problem == "connecting":
        text.append(" ● connecting", style="bold red")
    else:
        text.append(" ● disconnected", style="bold red")
    # before the counts: what is wrong with the dispatcher must not be the part an ellipsis cuts
    for condition in getattr(state, "conditions", None) or ():
        text.append(" │ ")
        text.append(plain(f"dispatcher: {condition.get('message') or condition.get('name', '')}"), style="bold red")
    counts = state.counts(now)
    text.append(" │ ")
    for i, name in enumerate(("queued", "running", "passed", "failed", "error")):
        if name == "error" and not counts[name]:
            continue
        text.append(" · " if i else "")
        text.append(f"{counts[name]} {name}", style=BUILD_STYLES[name] if counts[name] else "dim")
    text.append(" (last hour)" if wide else " (1h)", style="dim")
    if not state.connected and state.problem != "connecting":
        text.append(f" │ retrying ({plain(state.problem)})", style="bold red")
    return text


def render_queue(state, shown: list[dict], total: int, width: int = 80, style: str = "") -> RenderableType:
    """One line per queued build: number, branch, sha and why it waits always whole
    (the branch cut only past BRANCH_WIDTH); the subject gets what is left."""
    if not total:
        return Text("Queue: empty", no_wrap=True)
    parts: list[RenderableType] = [Text(f"Queue ({total})", no_wrap=True)]
    for build in shown:
        branch = truncate(plain(str(build.get("branch", ""))), BRANCH_WIDTH)
        head = f"#{build['id']} {branch} {str(build.get('sha') or '')[:7]} "
        waits = f" waits: {plain(state.why_waiting(build))}"
        subject = _subject(build)
        room = width - len(head) - len(waits)
        if room < 4:                # no room for a readable subject: leave it out
            subject = Text("")
        else:
            subject.truncate(room, overflow="ellipsis", pad=True)
        line = Text(head, style=style, no_wrap=True, overflow="ellipsis")
        line.append_text(subject)
        line.append(waits, style="yellow")
        parts.append(line)
    if total > len(shown):
        parts.append(Text(f"… and {total - len(shown)} more", style="dim"))
    return Group(*parts)


def render_log(state, lines: int) -> RenderableType:
    build_id = state.log_build
    if build_id is None:
        return Text("Log: no build has run yet", style="dim")
    if state.log_status == "not found":          # --follow of a build the dispatcher does not have
        return Text(f"Log of #{build_id}: no such build", style="bold", no_wrap=True)
    build = state.builds.get(build_id, {})
    status = state.log_status or build.get("status", "")
    title = Text(f"Log of #{build_id} ", style="bold", no_wrap=True, overflow="ellipsis")
    if build:
        title.append(plain(f"{build.get('branch', '')} {str(build.get('sha') or '')[:7]} "))
    title.append(_status(status))
    tail = [Text(line, no_wrap=True, overflow="crop") for line in state.log_tail(lines)]
    return Group(title, *tail)
