"""The live console: its state model fed recorded watch frames, its screens
rendered into a recording console, and the real `tinyci console` in a
pseudo-terminal and through a pipe against live daemons."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from rich.console import Console

from ci import tui
from ci.console_state import ConsoleState, clean
from conftest import TOOL_CWD, child_env, free_port

NOW = 1_700_000_000.0


def runner(name, state="idle", running=(), slots=1, labels=(), port=8889, seen=1.0):
    return {"name": name, "host": "127.0.0.1", "port": port, "labels": list(labels), "slots": slots,
            "state": state, "running": list(running), "last_seen": NOW - seen}


def build(id, status, runner=None, attempt=1, labels=(), reason="commit", subject=None, age=60.0,
          took=None, branch="main"):
    started = NOW - age + 1 if attempt else None
    return {"id": id, "repo": "/src/app", "branch": branch, "sha": f"{id:07x}" + "a" * 33,
            "subject": subject or f"change number {id}", "author": "Ada", "reason": reason,
            "status": status, "attempt": attempt, "runner": runner, "labels": list(labels),
            "created_at": NOW - age, "started_at": started,
            "finished_at": started + took if took is not None else None, "exit_code": None,
            "duration": took}


# A recorded first frame of a watch: two live runners (one busy), one dead,
# a queue of three, and a history with a failure.
SNAPSHOT = {
    "type": "ok",
    "runners": [runner("alpha", "busy", [41], labels=["linux"], seen=0.4),
                runner("beta", "idle", port=8890, seen=0.7),
                runner("gamma", "dead", port=8891, labels=["gpu"], seen=95)],
    "builds": [build(44, "queued", attempt=0, labels=["gpu"], age=2),
               build(43, "queued", attempt=0, age=3),
               build(42, "queued", attempt=0, reason="manual", age=4),
               build(41, "running", "alpha", age=20),
               build(40, "failed", "beta", age=300, took=12.5, subject="Break the parser"),
               build(39, "passed", "alpha", age=400, took=9.0),
               build(38, "passed", "alpha", age=3 * 3600, took=9.0)],
    "queue": [42, 43, 44],
}


def state(snapshot=SNAPSHOT, **kw) -> ConsoleState:
    b = ConsoleState("127.0.0.1:8888", **kw)
    b.snapshot(snapshot)
    return b


def screen(renderable, width=80, height=24, styles=False) -> str:
    console = Console(record=True, width=width, height=height, color_system="standard" if styles else None,
                      force_terminal=styles, file=open(os.devnull, "w"))
    console.print(renderable)
    console.file.close()
    return console.export_text(styles=styles)


# ---------------------------------------------------------------- the state model

def test_why_each_queued_build_waits():
    b = state()
    assert [x["id"] for x in b.queue()] == [42, 43, 44]
    why = {x["id"]: b.why_waiting(x) for x in b.queue()}
    # beta is idle, so unlabelled builds are about to start; only gamma had "gpu" and it is dead
    assert why == {42: "starting", 43: "starting", 44: "no runner with label gpu"}
    b.event({"type": "event", "event": "build", "build": build(42, "running", "beta", age=4)})
    assert b.why_waiting(b.queue()[0]) == "all 2 runners busy"
    for name in ("alpha", "beta"):
        b.event({"type": "event", "event": "runner", "runner": runner(name, "dead")})
    assert b.why_waiting(b.queue()[0]) == "no runner alive"


def test_events_keep_runners_slots_in_step_with_builds():
    b = state()
    b.event({"type": "event", "event": "build", "build": build(43, "running", "beta", age=3)})
    assert b.runners["beta"]["running"] == [43] and b.runners["beta"]["state"] == "busy"
    b.event({"type": "event", "event": "build", "build": build(41, "passed", "alpha", age=20, took=19)})
    b.event({"type": "event", "event": "build", "build": build(43, "cancelled", "beta", age=3, took=1)})
    assert b.runners["alpha"]["running"] == [] and b.runners["beta"]["running"] == []
    assert b.runners["alpha"]["state"] == b.runners["beta"]["state"] == "idle"
    b.event({"type": "event", "event": "something-new"})       # a newer dispatcher's event: ignored
    assert b.counts(NOW) == {"queued": 2, "running": 0, "passed": 2, "failed": 1, "error": 0,
                             "cancelled": 1}                    # build 38 is older than an hour


def test_a_draining_runner_shows_draining_then_drained_and_a_forgotten_one_leaves():
    b = state()
    b.event({"type": "event", "event": "runner", "runner": runner("alpha", "draining", [41], labels=["linux"])})
    b.event({"type": "event", "event": "runner", "runner": runner("beta", "drained", port=8890)})
    assert b.why_waiting(b.queue()[0]) == "all 2 runners that could take it are drained or draining"
    b.event({"type": "event", "event": "build", "build": build(41, "passed", "alpha", age=20, took=19)})
    assert b.runners["alpha"]["state"] == "drained"
    text = screen(tui.render_runners(b.runners.values(), NOW), width=100)
    assert re.search(r"alpha .* drained", text) and re.search(r"beta .* drained", text)
    b.event({"type": "event", "event": "runner_forgotten", "runner": {"name": "gamma"}})
    assert sorted(b.runners) == ["alpha", "beta"]


def test_log_tail_follows_newest_running_build_and_skips_resent_bytes():
    b = state()
    assert b.log_target() == 41
    b.log_start(41)
    b.log_chunk(41, 0, "$ make\ncompiling")
    b.log_chunk(41, 0, "$ make\ncompiling")                     # resent after a reconnect
    b.log_chunk(41, 16, " done\n\x1b[32mok\x1b[0m\r\nprogress 10%\rprogress 100%\n")
    assert b.log_tail(10) == ["$ make", "compiling done", "ok", "progress 100%"]
    b.log_chunk(40, 0, "someone else's log\n")                 # not the followed build
    assert len(b.log_tail(10)) == 4
    b.event({"type": "event", "event": "build", "build": build(45, "running", "beta", age=1)})
    assert b.log_target() == 45
    assert state(follow=40).log_target() == 40
    assert clean("a\tb\x07\x1b]0;title\x07c") == "a   bc"


def test_lost_connection_keeps_what_is_known():
    b = state()
    b.lost("connection refused")
    assert not b.connected and b.problem == "connection refused" and len(b.runners) == 3
    text = screen(tui.render_header(b, NOW), width=200)
    assert "disconnected │" in text and "retrying (connection refused)" in text


# ---------------------------------------------------------------- screens

def test_console_screen_at_80x24_shows_what_an_operator_looks_for():
    b = state()
    b.log_start(41)
    b.log_chunk(41, 0, "".join(f"test {i} ok\n" for i in range(40)) + "AssertionError: boom\n")
    text = screen(tui.render_console(b, NOW, 80, 24))
    lines = text.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), text
    assert "127.0.0.1:8888" in lines[0] and "connected" in lines[0]
    assert re.search(r"1 queued|3 queued", lines[0]) and "1 running" in lines[0] and "1 failed" in lines[0]
    assert re.search(r"alpha\s+127\.0\.0\.1:8889\s+linux\s+busy\s+1/1\s+#41\s+0\.4s ago", text)
    assert re.search(r"gamma .* dead", text)
    assert re.search(r"#44 .* waits: no runner with label gpu", text)
    assert re.search(r"#42 .*manual: change number 42", text)
    # the age of a finished build counts from when it finished; `try` is the first column to give way
    assert re.search(r"\b40\s+main\s+0000028\s+Break the parser\s+failed\s+(1\s+)?beta\s+12s\s+4m ago", text)
    assert "Log of #41 main 0000029 running" in text
    assert lines[-1].strip() == "AssertionError: boom"          # the tail ends at the newest line


def test_console_uses_a_bigger_terminal():
    many = dict(SNAPSHOT, builds=SNAPSHOT["builds"] + [build(i, "passed", "alpha", age=500 + i, took=3)
                                                       for i in range(1, 38)])
    b = state(many)
    small, big = screen(tui.render_console(b, NOW, 80, 24)), screen(tui.render_console(b, NOW, 160, 60), 160, 60)
    rows = lambda text: len(re.findall(r"^\s*\d+\s+main\s", text, re.M))
    assert rows(big) > rows(small) + 10
    assert max(len(line) for line in big.splitlines()) > 80


LONG = dict(SNAPSHOT, builds=[
    build(44, "queued", attempt=0, labels=["gpu-a100"], age=2, branch="feature/a-rather-long-branch",
          subject="A very long subject that says a great deal about what this change does"),
    build(41, "running", "alpha", age=20, subject="Another long subject line that goes on and on and on"),
    {**build(40, "failed", "beta", age=300, took=12.5, branch="release/2024-long",
             subject="Break the parser in a way that takes many words to say"), "job": "lint-and-types"},
    *[build(i, "passed", "alpha", age=400 + i, took=9.0) for i in range(1, 39)]])


def test_console_at_80_columns_cuts_the_subject_never_an_identifier():
    b = state(LONG)
    b.log_start(41)
    b.log_chunk(41, 0, "collecting\n")
    text = screen(tui.render_console(b, NOW, 80, 24))
    lines = text.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), text
    assert re.search(r"1 queued · 1 running · \d+ passed · 1 failed", lines[0])      # the header keeps its counts
    # the queued build: number, whole branch, sha and the label it waits for
    assert "#44 feature/a-rather-long-branch 000002c" in text and "waits: no runner with label gpu-a100" in text
    assert re.search(r"\b41\s+main\s+0000029\s+Another long.*…\s+running\s+", text)
    assert re.search(r"\b40\s+release/2024-long\s+0000028\s+Break the .*…\s+failed\s+lint-and-types\s+beta", text)
    # disconnected, the reason comes after the counts, and a narrow header cuts the reason
    b.lost("connection refused: the dispatcher at 127.0.0.1:8888 is not answering", NOW)
    header = screen(tui.render_console(b, NOW, 80, 24)).splitlines()[0]
    assert re.search(r"disconnected │ 1 queued · 1 running · \d+ passed · 1 failed", header), header


def test_console_at_160x50_widens_its_tables_and_fills_the_rows_the_log_does_not_need():
    b = state(LONG)
    b.log_start(41)
    b.log_chunk(41, 0, "one\ntwo\n")
    text = screen(tui.render_console(b, NOW, 160, 50), 160, 50)
    lines = text.splitlines()
    assert "A very long subject that says a great deal about what this change does" in text
    assert "Another long subject line that goes on and on and on" in text
    assert sum(1 for line in lines if len(line.rstrip()) > 150) >= 10       # tables as wide as the screen
    assert sum(1 for line in lines if not line.strip()) <= 2                # no screenful of empty rows
    assert lines[-2:] == ["one".ljust(160), "two".ljust(160)]


def test_a_disconnected_console_dims_its_rows_and_stops_the_running_clocks():
    b = state(LONG)
    def dim_rows(styled: str) -> list[str]:
        return [line for line in styled.splitlines() if ("0000029" in line or "127.0.0.1:8889" in line)
                and re.search(r"\x1b\[(\d+;)*2(;\d+)*m", line)]
    assert dim_rows(screen(tui.render_console(b, NOW, 120, 30), 120, 30, styles=True)) == []
    b.lost("connection refused", NOW)
    later = screen(tui.render_console(b, NOW + 90, 120, 30), 120, 30, styles=True)
    plain_later = screen(tui.render_console(b, NOW + 90, 120, 30), 120, 30)
    assert len(dim_rows(later)) >= 2                 # dim: the picture may be stale
    assert re.search(r"\b41\s+main\s+0000029\s+.*running\s+1\s+-\s+alpha\s+19s\s+", plain_later)   # took: still 19s
    assert re.search(r"alpha\s+127\.0\.0\.1:8889.*0\.4s ago", plain_later)       # last seen: as it was
    b.snapshot(LONG)                                 # back: clocks run again
    again = screen(tui.render_console(b, NOW + 90, 120, 30), 120, 30)
    assert re.search(r"\b41\s+main\s+0000029\s+.*running\s+1\s+-\s+alpha\s+1m49s\s+", again)


def test_console_colours_statuses_and_shows_a_disconnected_dispatcher():
    b = state()
    b.lost("connection refused")
    styled = screen(tui.render_console(b, NOW, 100, 30), 100, 30, styles=True)
    assert "\x1b[1;31mdead" in styled and "\x1b[31mfailed" in styled and "\x1b[33mrunning" in styled
    assert "disconnected" in styled
    assert "retrying (connection refused)" in screen(tui.render_header(b, NOW), 200, styles=True)


def test_the_dispatchers_conditions_head_the_console_and_the_status_tables():
    b = state({**SNAPSHOT, "conditions": [{"name": "disk_full", "message": "disk full (12 MB free)",
                                           "since": NOW - 30}]})
    header = screen(tui.render_console(b, NOW, 80, 24)).splitlines()[0]
    assert "dispatcher: disk full (12 MB free)" in header
    assert "dispatcher: disk full (12 MB free)" in screen(tui.render_status(b.status_snapshot(), NOW)).splitlines()[0]
    b.event({"type": "event", "event": "conditions", "conditions": []})        # cleared
    assert "dispatcher:" not in screen(tui.render_console(b, NOW, 80, 24))
    assert "dispatcher:" not in screen(tui.render_status(b.status_snapshot(), NOW))


def test_nothing_a_peer_sent_is_drawn_as_markup_or_a_control():
    hostile = dict(SNAPSHOT,
                   runners=[{**runner("alpha", "busy", [41], labels=["[i]gpu"]), "host": "[link=file:///etc/passwd]x"}],
                   builds=[build(41, "running", "alpha", subject="[bold red]x[/] \x1b[2Jy\x9b1A", branch="b\u202er"),
                           build(42, "queued", attempt=0, reason="[u]manual", subject="\x1b]52;c;eA==\x07q")])
    b = state(hostile)
    b.log_start(41)
    b.log_chunk(41, 0, "[red]log[/] \x1b]8;;file:///etc/passwd\x1b\\link\n")
    b.lost("\x1b]0;title\x07refused [blink]now[/]")
    styled = screen(tui.render_console(b, NOW, 120, 30), width=120, height=30, styles=True)
    assert "\x1b]" not in styled and "\x1b" not in re.sub(r"\x1b\[[0-9;]*m", "", styled)
    text = screen(tui.render_console(b, NOW, 120, 30), width=120, height=30)
    for literal in ("[link=file:///etc/passwd]x:8889", "[i]gpu", "[bold red]x[/] y", "[u]manual: q",
                    "[red]log[/] link", "Log of #41 br"):
        assert literal in text, literal
    assert "retrying (refused [blink]now[/])" in screen(tui.render_header(b, NOW), width=200)
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e]", text)


def test_empty_console_says_what_to_do():
    b = ConsoleState("127.0.0.1:8888")
    text = screen(tui.render_console(b, NOW, 80, 24))
    assert "connecting" in text and "tinyci runner" in text and "Queue: empty" in text


# ---------------------------------------------------------------- the real console

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


class Terminal:
    """`tinyci console` in a pseudo-terminal of a given size; frames are what
    rich drew after each cursor-home."""

    def __init__(self, argv: list[str], cols: int = 100, rows: int = 30):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "ci", *argv], stdin=slave, stdout=slave,
                                     stderr=slave, env=child_env(TERM="xterm-256color"), cwd=TOOL_CWD,
                                     start_new_session=True)
        os.close(slave)
        self.out = b""

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:             # the child closed its side
                    return
                if not data:
                    return
                self.out += data

    def frames(self) -> list[str]:
        return [ANSI.sub(b"", f).decode(errors="replace") for f in self.out.split(b"\x1b[H")[-3:]]

    def wait_for(self, pattern: str, what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump(0.1)
            for frame in self.frames():
                if re.search(pattern, frame, re.M):
                    return frame
        raise AssertionError(f"the console never showed {what} ({pattern!r}); last frame:\n"
                             f"{self.frames()[-1]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


def test_console_in_a_terminal_shows_a_commit_go_from_running_to_passed(cluster, repo, tmp_path):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    c.wait_builds(lambda b: len(b) == 1 and b[0]["status"] == "passed", "the first commit to pass")
    term = Terminal(["console", "--dispatcher", c.disp.addr])
    try:
        term.wait_for(r"^\s*1\s+main\s+\w{7}\s+initial\s+passed\s+1\s+r1", "build 1 passed", timeout=15)
        term.wait_for(r"r1\s+127\.0\.0\.1:\d+\s+-\s+idle\s+0/1", "r1 idle")
        go = tmp_path / "go"
        sha = repo.commit("wait for the test", {"build.sh": (
            f"echo waiting for the test; i=0\n"
            f"while [ ! -f {go} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\necho released\n")})
        frame = term.wait_for(rf"^\s*2\s+main\s+{sha[:7]}\s+wait for the test\s+running\s+1\s+r1", "build 2 running")
        assert re.search(r"r1\s+127\.0\.0\.1:\d+\s+-\s+busy\s+1/1\s+#2", frame), frame
        term.wait_for(r"Log of #2 main .* running", "the log of build 2")
        term.wait_for(r"^waiting for the test\s*$", "build 2's output")
        go.touch()
        frame = term.wait_for(rf"^\s*2\s+main\s+{sha[:7]}\s+wait for the test\s+passed", "build 2 passed")
        assert re.search(r"^released\s*$", frame, re.M) or "released" in term.wait_for("released", "the tail")
        os.kill(term.proc.pid, signal.SIGINT)
        term.pump(3)
        assert term.proc.wait(10) == 0
        # the screen the console borrowed is given back, with the cursor visible
        assert term.out.rstrip().endswith(b"\x1b[?25h\x1b[?1049l"), term.out[-200:]
    finally:
        term.close()


def test_console_without_a_terminal_prints_plain_snapshots_and_rides_out_a_dispatcher_restart(cluster, tmp_path):
    c = cluster()
    disp = c.dispatcher(port=free_port())
    c.runner("r1")
    proc = subprocess.Popen([sys.executable, "-m", "ci", "console", "--dispatcher", disp.addr],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=child_env(COLUMNS="90"), cwd=TOOL_CWD)
    out = b""

    def until(pattern: bytes, what: str, timeout: float = 30.0) -> None:
        nonlocal out
        start = len(out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                out += os.read(proc.stdout.fileno(), 65536)
                if re.search(pattern, out[start:]):
                    return
        raise AssertionError(f"no {what} in the console's output:\n{out.decode(errors='replace')}")

    try:
        until(rb"connected .*\n(.*\n)*.*r1\s+127\.0\.0\.1", "snapshot with r1")
        disp.kill()
        until(rb"\xe2\x97\x8f disconnected", "disconnected line")
        disp.start()
        until(rb"\xe2\x97\x8f connected", "reconnection")
        os.kill(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        out += rest
        assert b"\x1b" not in out                   # no escape codes in a pipe
        assert all(len(line) <= 90 for line in out.decode().splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_console_once_against_nothing_is_one_line_exit_1():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "ci", "console", "--once", "--dispatcher", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, env=child_env(), cwd=TOOL_CWD, timeout=30)
    assert done.returncode == 1
    assert done.stderr == f"tinyci: cannot reach the dispatcher at 127.0.0.1:{port} (connection refused)\n"


def test_a_dispatcher_that_stops_answering_shows_as_disconnected():
    """A frozen dispatcher: the watch goes silent, then every new attempt times out
    in its greeting. The screen must stop claiming "connected"."""
    import asyncio

    from ci import net
    from ci.console import Live

    class FrozenAfterOneSnapshot:
        addr = "127.0.0.1:9"
        attempts = 0

        def client(self, role):
            link = self

            class Client:
                async def stream(self, msg, idle=None):
                    link.attempts += 1
                    if link.attempts == 1:
                        yield {"type": "ok", **SNAPSHOT}
                    await asyncio.sleep(0.01)       # a real attempt takes time
                    raise net.PeerTimeout("no answer")

                async def close(self):
                    pass
            return Client()

    async def body():
        link = FrozenAfterOneSnapshot()
        live = Live(link, ConsoleState(link.addr), Console(record=True, width=80))
        task = asyncio.ensure_future(live.watch())
        deadline = asyncio.get_running_loop().time() + 10
        while (live.state.connected or link.attempts < 2) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        live.stop.set()
        await asyncio.wait_for(task, 10)
        return live.state, link.attempts

    state_after, attempts = asyncio.run(body())
    assert attempts >= 2
    assert not state_after.connected and state_after.problem == "timed out"


COMMIT = {"type": "commit", "repo": "/src/app", "branch": "main", "author": "Ada", "subject": "a change", "time": 1.0}


def test_a_reader_that_goes_away_ends_status_watch_and_console_quietly(cluster):
    """`tinyci status --watch | head -1`, `tinyci console | head -5`: once the reader is gone, the next
    snapshot ends the command with exit 0 and no traceback."""
    c = cluster()
    disp = c.dispatcher()
    for number, argv in enumerate((["status", "--watch"], ["console"]), 1):
        proc = subprocess.Popen([sys.executable, "-m", "ci", *argv, "--dispatcher", disp.addr],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=child_env(), cwd=TOOL_CWD)
        try:
            assert proc.stdout.readline()           # the first snapshot is out; the reader leaves
            proc.stdout.close()
            c.request({**COMMIT, "sha": f"{number:040x}"}, role="observer")     # a change to print
            code = proc.wait(30)
            err = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert code == 0 and err == "", err
