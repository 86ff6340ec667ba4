"""The `tinyci` command: help, one-line errors, the tool commands against a
stand-in dispatcher, the status tables, and `tinyci up`'s start-up checks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from ci import cli, net, protocol, tui, up
from ci.local import CEILING

from conftest import TOOL_CWD, child_env, free_port, pid_alive, tinyci

ROOT = Path(__file__).resolve().parent.parent


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    assert "Traceback" not in text
    return lines[0]


# ---------------------------------------------------------------- help

def test_top_level_help_describes_tinyci():
    done = tinyci("--help")
    assert done.returncode == 0
    for word in ("observer", "dispatcher", "runner", "up --demo", "status", "log", "trigger",
                 "cancel", "rebuild", "notify", "console"):
        assert word in done.stdout


@pytest.mark.parametrize("command, flags", [
    ("up", ["--repo", "--demo", "--runners", "--port", "--data", "--interval", "--config"]),
    ("status", ["--dispatcher", "--json", "--limit", "--config", "--watch"]),
    ("console", ["--dispatcher", "--follow", "--once", "--config"]),
    ("log", ["BUILD", "--follow", "--dispatcher"]),
    ("trigger", ["--branch", "REV"]),
    ("cancel", ["BUILD"]),
    ("rebuild", ["BUILD"]),
    ("drain", ["NAME", "--dispatcher"]),
    ("resume", ["NAME", "--dispatcher"]),
    ("forget", ["NAME", "--dispatcher"]),
    ("notify", ["--observer", "--branch"]),
    ("dispatcher", ["--port", "--data", "--config"]),
    ("observer", ["--repo", "--dispatcher", "--port"]),
    ("runner", ["--dispatcher", "--port"]),
])
def test_each_command_has_help(command, flags):
    done = tinyci(command, "--help")
    assert done.returncode == 0, done.stderr
    for flag in flags:
        assert flag in done.stdout


def test_help_does_not_load_the_daemons():
    code = ("import sys\nfrom ci import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m in ('git', 'rich', 'ci.dispatcher', 'ci.runner',"
            " 'ci.observer', 'yaml')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=30, env=child_env())
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_notify_does_not_load_git_yaml_rich_asyncio_or_the_daemons():
    # the git hook runs notify on every commit: it must stay quick to start
    code = ("import sys\nfrom ci import cli\ncli.main(['notify', '--observer', '127.0.0.1:1'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('git', 'rich', 'yaml', 'asyncio') or m in "
            "('ci.dispatcher', 'ci.runner', 'ci.observer', 'ci.config', 'ci.execution', 'importlib.metadata')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=30, env=child_env())
    assert "cannot reach the observer" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- unreachable peers

@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["log", "3"], ["log", "3", "--follow"],
                                  ["trigger", "--branch", "main"], ["cancel", "3"], ["rebuild", "3"]])
def test_unreachable_dispatcher_is_one_line(argv):
    port = free_port()
    done = tinyci(*argv, "--dispatcher", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert one_line(done.stderr) == (
        f"tinyci: cannot reach the dispatcher at 127.0.0.1:{port} (connection refused) "
        f"— is it running? (tinyci up / tinyci dispatcher)")
    assert done.stdout == ""


def test_dispatcher_address_comes_from_the_config(tmp_path):
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(f"dispatcher:\n  port: {port}\n")
    assert f"127.0.0.1:{port} (connection refused)" in tinyci("status", "--config", str(config)).stderr
    env_port = free_port()
    done = tinyci("status", TINYCI_DISPATCHER_PORT=str(env_port))
    assert f"127.0.0.1:{env_port} (connection refused)" in done.stderr


def test_configuration_error_is_one_line_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dispatcher:\n  prot: 1\n")
    done = tinyci("status", "--config", str(config))
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "dispatcher.prot" in line and str(config) in line


def test_bad_dispatcher_address_is_a_usage_error():
    done = tinyci("status", "--dispatcher", "localhost:notaport")
    assert done.returncode == 2 and "notaport" in one_line(done.stderr)


def test_notify_without_observer_never_fails():
    done = tinyci("notify", "--observer", f"127.0.0.1:{free_port()}", "--branch", "main")
    assert done.returncode == 0
    assert "cannot reach the observer" in one_line(done.stderr)
    assert done.stdout == ""


def test_notify_with_broken_config_still_exits_0(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("observer: [\n")
    done = tinyci("notify", "--config", str(config))
    assert done.returncode == 0
    assert "c.yaml" in one_line(done.stderr)


# ---------------------------------------------------------------- against a stand-in dispatcher

NOW = 1_700_000_000.0
SNAPSHOT = {
    "runners": [
        {"name": "runner-1", "host": "127.0.0.1", "port": 8889, "labels": ["linux"], "slots": 2,
         "state": "busy", "running": [7], "last_seen": NOW - 0.5},
        {"name": "runner-2", "host": "127.0.0.1", "port": 8890, "labels": [], "slots": 1,
         "state": "dead", "running": [], "last_seen": NOW - 95},
    ],
    "builds": [
        {"id": 7, "repo": "/r", "branch": "main", "sha": "abcdef0123456789" * 2 + "01234567",
         "subject": "Teach the parser about tabs, spaces and everything in between, at length",
         "author": "A", "reason": "commit", "status": "running", "attempt": 1, "runner": "runner-1",
         "labels": [], "created_at": NOW - 30, "started_at": NOW - 12, "finished_at": None,
         "exit_code": None, "duration": None},
        {"id": 6, "repo": "/r", "branch": "feature/x", "sha": "1234567" + "0" * 33, "subject": "Fix",
         "author": "B", "reason": "commit", "status": "failed", "attempt": 2, "runner": "runner-2",
         "labels": [], "created_at": NOW - 4000, "started_at": NOW - 3990, "finished_at": NOW - 3800,
         "exit_code": 1, "duration": 190.0},
    ],
}
LOGS = {1: ("passed", ["=== build 1 ===\n", "1 passed in 0.01s\n"]),
        2: ("failed", ["=== build 2 ===\n", "AssertionError: ünïcode\n"]),
        # escapes and a CR LF cut between chunks, as a log may arrive
        3: ("failed", ["ok\r", "\nFAILED\r=== passed ===\n\x1b]52;c;", "eA==\x07\x1b[3", "1mred\x1b[0m\n"]),
        # bulk frames (bytes), many and big: each one's bytes stay in the tool's kept buffers until written
        4: ("passed", [b"".join(b"chunk %02d line %06d\n" % (n, i) for i in range(40_000)) for n in range(12)])}
HOSTILE = "\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\x9b1A"
ARTIFACT = b"\x1b]52;c;eA==\x07report \x1b[1A\xc2\x9b2Jok\n"


class StandIn:
    """A dispatcher (and observer) made of net.serve and canned answers, in a thread."""

    def __init__(self, secret: str = "", identity: str = protocol.DISPATCHER_ID):
        self.secret, self.identity = secret, identity
        self.received: list[dict] = []
        self.retention = True           # what `gc` answers: a policy, or retention off
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, conn: net.Connection, msg: dict):
        self.received.append(msg)
        kind = msg["type"]
        if kind == "status":
            return protocol.ok(**SNAPSHOT, pipelines=[], queue=[])
        if kind == "read_log":
            if msg["build"] not in LOGS:
                return protocol.error("not_found", f"no build {msg['build']}")
            status, chunks = LOGS[msg["build"]]
            offset = 0
            for data in chunks:
                if offset >= msg.get("offset", 0):
                    await conn.send({"type": "chunk", "offset": offset, "data": data})
                offset += len(data if isinstance(data, bytes) else data.encode())
            await conn.send({"type": "end", "status": status, "offset": offset})
            return None
        if kind == "trigger":
            return protocol.ok(builds=[8])
        if kind == "rebuild" and msg["build"] == 66:
            return protocol.error("not_found", f"{HOSTILE}no build 66\nat all")
        if kind == "rebuild":
            return protocol.ok(builds=[9])
        if kind == "artifacts":
            return protocol.ok(artifacts=[{"path": f"{HOSTILE}report.txt", "size": len(ARTIFACT)}])
        if kind == "read_artifact":
            await conn.send(protocol.ok(size=len(ARTIFACT)))
            half = len(ARTIFACT) // 2       # two chunks: the tool follows the offsets
            await conn.send({"type": "chunk", "offset": 0, "data": ARTIFACT[:half]})
            await conn.send({"type": "chunk", "offset": half, "data": ARTIFACT[half:]})
            await conn.send({"type": "end", "offset": len(ARTIFACT)})
            return None
        if kind == "cancel":
            return protocol.error("finished", f"build {msg['build']} is already passed")
        if kind == "poke":
            return protocol.ok()
        if kind == "gc":
            days = 30.0 if self.retention else 0.0
            return protocol.ok(builds=412 if days else 0, log_bytes=96_300_000 if days else 0,
                               artifact_bytes=1_234_000_000 if days else 0, days=days, per_branch=0,
                               dry_run=msg.get("dry_run", False), db_bytes=0 if msg.get("dry_run") else 8192)
        return protocol.error("unexpected", kind)

    def __enter__(self) -> "StandIn":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            net.serve(self.handle, "127.0.0.1", 0, secret=self.secret, identity=self.identity),
            self.loop).result(10)
        self.addr = "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def close():
            self.server.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def standin(monkeypatch):
    for name in [n for n in os.environ if n.startswith("TINYCI_") and n != CEILING]:
        monkeypatch.delenv(name)
    with StandIn() as server:
        yield server


# What a tool that asks the dispatcher once, or streams a log or an artifact,
# must not import at each start when nothing needs it: an event loop, TLS
# (none configured), the configuration and YAML (no file, no TINYCI_*
# variable), the dispatcher's build files, a server's gate and logging, a MAC
# (no secret), a daemon's reconnect backoff (random), a runner's JUnit parser,
# the IDNA codec (the dispatcher's address is plain ASCII), shutil (argparse's
# terminal width), typing (the annotations' names).
NOT_AT_START = ("asyncio", "ssl", "yaml", "ci.config", "ci.settings", "ci.buildfile", "ci.gate", "logging",
                "hmac", "secrets", "random", "defusedxml", "xml", "encodings.idna", "shutil", "typing")


@pytest.mark.parametrize("argv", [["status", "--json"], ["artifacts", "7"], ["log", "1"], ["cancel", "3"],
                                  ["artifacts", "7", "--get", "report.txt", "-o", "{tmp}/got"]])
def test_a_tool_starts_without_what_it_does_not_use(standin, tmp_path, argv):
    argv = [word.format(tmp=tmp_path) for word in argv] + ["--dispatcher", standin.addr]
    code = ("import sys\nfrom ci import cli\ncode = cli.main(sys.argv[1:])\n"
            f"print(code, sorted(m for m in sys.modules if m.split('.')[0] in {NOT_AT_START!r} or m in {NOT_AT_START!r}))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=TOOL_CWD,
                          timeout=30, env=child_env())
    last = done.stdout.strip().splitlines()[-1]
    assert last == ("1 []" if argv[0] == "cancel" else "0 []"), done.stderr      # cancel: the stand-in refuses
    if "--get" in argv:
        assert (tmp_path / "got").read_bytes() == ARTIFACT


@pytest.mark.parametrize("columns", [50, 200])
def test_help_is_as_wide_as_columns_says(columns):
    # the width argparse would take from shutil, found without importing it
    done = subprocess.run([sys.executable, "-m", "ci", "artifacts", "--help"], capture_output=True, text=True,
                          cwd=TOOL_CWD, timeout=30, env=child_env(COLUMNS=str(columns)))
    widest = max(len(line) for line in done.stdout.splitlines())
    assert columns - 20 < widest <= columns - 2, done.stdout


def test_the_status_table_starts_without_the_junit_parser(standin):
    # the table shows a build's test counts (reports.summary); parsing JUnit XML is the runner's
    code = ("import sys\nfrom ci import cli\ncode = cli.main(sys.argv[1:])\n"
            "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('defusedxml', 'xml')))")
    done = subprocess.run([sys.executable, "-c", code, "status", "--dispatcher", standin.addr], capture_output=True,
                          text=True, cwd=TOOL_CWD, timeout=30, env=child_env())
    assert "runner-1" in done.stdout, done.stderr    # the table was drawn
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stderr


def test_the_tools_defaults_are_the_configurations():
    from ci.config import Config
    defaults = Config()
    assert cli.DEFAULT_DISPATCHER == f"{defaults.dispatcher.host}:{defaults.dispatcher.port}"
    assert cli.DEFAULT_OBSERVER == f"{defaults.observer.host}:{defaults.observer.port}"


def test_a_tool_reads_yaml_only_for_a_config_file(standin, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("build:\n  timeout: 60\n")
    code = ("import sys\nfrom ci import cli\ncli.main(sys.argv[1:])\n"
            "print(sorted(m for m in ('yaml', 'ssl', 'asyncio', 'typing') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, "status", "--json", "--dispatcher", standin.addr,
                           "--config", str(config)], capture_output=True, text=True, cwd=TOOL_CWD, timeout=30,
                          env=child_env())
    assert done.stdout.strip().splitlines()[-1] == "['yaml']", done.stderr


def test_status_json_is_one_object(standin, capsys):
    assert cli.main(["status", "--json", "--limit", "5", "--dispatcher", standin.addr]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"runners": SNAPSHOT["runners"], "builds": SNAPSHOT["builds"], "pipelines": [],
                               "conditions": []}
    assert standin.received[-1] == {"type": "status", "limit": 5}


def test_gc_says_what_a_sweep_would_delete_and_what_one_deleted(standin, capsys):
    assert cli.main(["gc", "--dry-run", "--dispatcher", standin.addr]) == 0
    assert capsys.readouterr().out == ("a sweep would delete 412 finished build(s) older than 30 day(s): "
                                       "96.3 MB of logs, 1.2 GB of artifacts\n")
    assert standin.received[-1] == {"type": "gc", "dry_run": True}
    assert cli.main(["gc", "--dispatcher", standin.addr]) == 0
    assert capsys.readouterr().out.endswith("of artifacts; the database gave back 8.2 KB\n")
    standin.retention = False
    assert cli.main(["gc", "--dispatcher", standin.addr]) == 0
    assert capsys.readouterr().out.startswith("retention is off (retention.days and retention.per_branch are 0")


def test_status_tables(standin, capsys):
    assert cli.main(["status", "--dispatcher", standin.addr]) == 0
    out = capsys.readouterr().out
    for text in ("runner-1", "runner-2", "dead", "busy", "running", "failed", "abcdef0", "feature"):
        assert text in out


def test_log_prints_chunks_and_follow_exit_code(standin, capsys):
    assert cli.main(["log", "1", "--dispatcher", standin.addr]) == 0
    assert capsys.readouterr().out == "".join(LOGS[1][1])
    assert cli.main(["log", "1", "--follow", "--dispatcher", standin.addr]) == 0
    assert cli.main(["log", "2", "--follow", "--dispatcher", standin.addr]) == 1
    captured = capsys.readouterr()
    assert captured.out.endswith("AssertionError: ünïcode\n")
    assert "build 2 failed" in captured.err
    assert cli.main(["log", "#2", "--dispatcher", standin.addr]) == 0    # not following: exit 0


def test_log_is_cleaned_as_it_streams_and_raw_is_the_bytes(standin, capsys):
    assert cli.main(["log", "3", "--dispatcher", standin.addr]) == 0
    assert capsys.readouterr().out == "ok\nFAILED\n=== passed ===\nred\n"     # no terminal: no colour either
    assert cli.main(["log", "3", "--raw", "--dispatcher", standin.addr]) == 0
    assert capsys.readouterr().out == "".join(LOGS[3][1])


def test_what_a_peer_says_is_printed_as_plain_text(standin, capsys):
    assert cli.main(["rebuild", "66", "--dispatcher", standin.addr]) == 1
    assert capsys.readouterr().err == "tinyci: no build 66 at all\n"
    assert cli.main(["artifacts", "5", "--dispatcher", standin.addr]) == 0
    assert capsys.readouterr().out == f"{len(ARTIFACT):>12}  report.txt\n"


def test_an_artifact_is_its_bytes_in_a_pipe_and_plain_text_on_a_terminal(standin):
    from test_terminal import in_pty, screen_text
    piped = subprocess.run([sys.executable, "-m", "ci", "artifacts", "5", "--get", "report.txt",
                            "--dispatcher", standin.addr], capture_output=True, env=child_env(), cwd=TOOL_CWD,
                           timeout=60, stdin=subprocess.DEVNULL)
    assert piped.returncode == 0 and piped.stdout == ARTIFACT
    code, out = in_pty(["artifacts", "5", "--get", "report.txt", "--dispatcher", standin.addr])
    assert code == 0 and screen_text(out, colour=True) == "report ok\n"


def test_an_artifact_to_a_full_output_is_one_line_not_a_traceback(standin):
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "ci", "artifacts", "5", "--get", "report.txt",
                               "--dispatcher", standin.addr], stdout=full, stderr=subprocess.PIPE, text=True,
                              env=child_env(), cwd=TOOL_CWD, timeout=60, stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stderr) == (1, "tinyci: cannot write the standard output: No space left on device\n")


@pytest.mark.parametrize("raw", [False, True])
def test_a_big_log_in_bulk_frames_is_written_whole_and_in_order(standin, tmp_path, raw):
    out = tmp_path / "log.txt"
    with open(out, "wb") as f:
        done = subprocess.run([sys.executable, "-m", "ci", "log", "4", *(["--raw"] if raw else []),
                               "--dispatcher", standin.addr], stdout=f, stderr=subprocess.PIPE, env=child_env(),
                              cwd=TOOL_CWD, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"".join(LOGS[4][1])


def test_log_of_unknown_build_is_the_dispatchers_message(standin, capsys):
    assert cli.main(["log", "99", "--dispatcher", standin.addr]) == 1
    assert capsys.readouterr().err == "tinyci: no build 99\n"


def test_operator_commands_print_build_numbers(standin, capsys):
    assert cli.main(["trigger", "--branch", "main", "--dispatcher", standin.addr]) == 0
    assert standin.received[-1] == {"type": "trigger", "branch": "main"}
    assert cli.main(["trigger", "HEAD~1", "--dispatcher", standin.addr]) == 0
    assert standin.received[-1] == {"type": "trigger", "rev": "HEAD~1"}
    assert cli.main(["rebuild", "6", "--dispatcher", standin.addr]) == 0
    assert capsys.readouterr().out.split("\n") == ["build 8 queued", "build 8 queued", "build 9 queued", ""]
    assert cli.main(["cancel", "6", "--dispatcher", standin.addr]) == 1
    assert capsys.readouterr().err == "tinyci: build 6 is already passed\n"


def test_trigger_needs_something_to_build(standin, capsys):
    assert cli.main(["trigger", "--dispatcher", standin.addr]) == 2
    assert "--branch" in capsys.readouterr().err
    assert standin.received == []


def test_notify_pokes_the_observer(capsys):
    with StandIn(identity=protocol.OBSERVER_ID) as observer:
        assert cli.main(["notify", "--observer", observer.addr, "--branch", "main"]) == 0
        assert observer.received == [{"type": "poke", "branch": "main"}]
    assert capsys.readouterr().err == ""


def test_shared_secret(monkeypatch, capsys):
    with StandIn(secret="s3cret") as server:
        monkeypatch.setenv("TINYCI_AUTH_SECRET", "s3cret")
        assert cli.main(["status", "--json", "--dispatcher", server.addr]) == 0
        capsys.readouterr()
        monkeypatch.setenv("TINYCI_AUTH_SECRET", "wrong")
        assert cli.main(["status", "--dispatcher", server.addr]) == 1
        err = capsys.readouterr().err
        assert "refused our credentials" in err and "TINYCI_AUTH_SECRET" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- tables

def render(renderable, width: int = 100) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_status_rendering_shows_runners_and_builds():
    text = render(tui.render_status(SNAPSHOT, NOW))
    runners, builds = text.split("Builds")
    assert re.search(r"runner-1\s+127\.0\.0\.1:8889\s+linux\s+busy\s+1/2\s+#7\s+0\.5s ago", runners)
    assert re.search(r"runner-2\s+127\.0\.0\.1:8890\s+-\s+dead\s+0/1\s+-\s+1m ago", runners)
    assert re.search(r"7\s+main\s+abcdef0\s+Teach the parser.*…\s+running\s+1\s+runner-1\s+12s\s+30s ago",
                     builds)
    assert re.search(r"6\s+feature/x\s+1234567\s+Fix\s+failed\s+2\s+runner-2\s+3m10s\s+1h03m ago", builds)
    assert "abcdef01" not in builds          # short sha is 7 characters


def test_status_rendering_narrow_terminal_keeps_numbers_and_statuses():
    text = render(tui.render_status(SNAPSHOT, NOW), width=70)
    for word in ("runner-1", "dead", "running", "failed"):
        assert word in text
    assert all(len(line) <= 70 for line in text.splitlines())


def test_status_rendering_colours_states():
    console = Console(record=True, width=100, color_system="standard", force_terminal=True)
    console.print(tui.render_runners(SNAPSHOT["runners"], NOW))
    console.print(tui.render_builds(SNAPSHOT["builds"], NOW))
    styled = console.export_text(styles=True)
    assert "\x1b[1;31mdead" in styled and "\x1b[31mfailed" in styled


def test_status_says_why_each_queued_build_waits_in_the_consoles_words():
    queued = lambda id, labels: {**SNAPSHOT["builds"][1], "id": id, "status": "queued", "attempt": 0,
                                 "runner": None, "labels": labels, "duration": None}
    snapshot = dict(SNAPSHOT, builds=[queued(9, ["gpu"]), queued(8, ["linux"]), *SNAPSHOT["builds"]])
    text = render(tui.render_status(snapshot, NOW))
    assert "#9 waits: no runner with label gpu" in text
    assert "#8 waits: starting" in text           # runner-1 has a free slot of two
    assert len(re.findall(r"waits:", text)) == 2            # running and finished builds do not wait
    assert "waits" not in render(tui.render_status(SNAPSHOT, NOW))
    told = dict(snapshot, builds=[{**queued(9, ["gpu"]), "waiting": "runner runner-9 busy"}])
    assert "#9 waits: runner runner-9 busy" in render(tui.render_status(told, NOW))   # the dispatcher's word


def test_empty_snapshot_says_what_to_do():
    text = render(tui.render_status({"runners": [], "builds": []}, NOW))
    assert "tinyci runner" in text and "tinyci trigger" in text


# ---------------------------------------------------------------- tinyci up: checks before starting

def test_up_rejects_a_directory_that_is_not_a_clone(tmp_path):
    done = tinyci("up", "--repo", str(tmp_path), "--data", str(tmp_path / "data"), cwd=tmp_path)
    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"tinyci up: --repo {tmp_path} is not a git repository (give the path of a git clone)")
    assert not (tmp_path / "data").exists()


def test_up_rejects_a_missing_repo(tmp_path):
    done = tinyci("up", "--repo", str(tmp_path / "nope"), cwd=tmp_path)
    assert done.returncode == 2 and "no such directory" in one_line(done.stderr)


def test_up_outside_a_repo_suggests_repo_or_demo(tmp_path):
    done = tinyci("up", cwd=tmp_path)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "--repo" in line and "--demo" in line


@pytest.mark.parametrize("argv, word", [(["--runners", "0"], "--runners"), (["--port", "65535"], "--port"),
                                        (["--interval", "0"], "--interval")])
def test_up_rejects_bad_numbers(tmp_path, argv, word):
    done = tinyci("up", "--demo", "--data", str(tmp_path), *argv, cwd=tmp_path)
    assert done.returncode == 2 and word in one_line(done.stderr)


@pytest.mark.slow
def test_demo_repository_has_a_passing_test_and_is_made_once(tmp_path):
    repo = up.make_demo(tmp_path / "demo")
    log = subprocess.run(["git", "-C", str(repo), "log", "--format=%s", "main"], capture_output=True, text=True)
    assert log.stdout.splitlines() == ["Add calc and its test"]
    assert subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                          text=True).stdout == ""
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=repo,
                           capture_output=True, text=True, timeout=60, env=child_env())
    assert tests.returncode == 0, tests.stdout
    assert "1 passed" in tests.stdout
    assert up.make_demo(tmp_path / "demo") == repo       # second time: reused as is


# ---------------------------------------------------------------- tinyci up: real daemons

needs_daemons = pytest.mark.slow       # `tinyci up` starts real daemons


class Up:
    """`tinyci up` as a real process; stopped by its PID."""

    def __init__(self, tmp_path: Path, *argv: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ci", "up", "--data", str(tmp_path / "data"), *argv],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
            stdin=subprocess.DEVNULL)
        self.lines: list[str] = []

    def read_until(self, marker: str, timeout: float = 60) -> None:
        result: list[bool] = []

        def reader():
            for line in self.proc.stdout:
                self.lines.append(line)
                if marker in line:
                    result.append(True)
                    return
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        thread.join(timeout)
        assert result, f"no {marker!r} from tinyci up; stdout so far: {''.join(self.lines)}"

    def children(self) -> dict[str, tuple[str, int]]:
        found = {}
        for line in self.lines:
            match = re.match(r"\s+(\S+)\s+(\S+:\d+)\s+pid (\d+)", line)
            if match:
                found[match.group(1)] = (match.group(2), int(match.group(3)))
        return found

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.mark.slow
@needs_daemons
def test_up_demo_builds_the_first_commit_and_stops_cleanly(tmp_path):
    run = Up(tmp_path, "--demo", "--port", "0", "--runners", "2", "--interval", "0.2")
    try:
        run.read_until("Press Ctrl-C")
        children = run.children()
        assert sorted(children) == ["dispatcher", "observer", "runner-1", "runner-2", "web"]
        assert run.lines[0].startswith(f"tinyci is up: {children['web'][0]}")    # the page's address first
        addr = children["dispatcher"][0]
        # up made a secret for its daemons: owner-only, never on a command line, needed by tools
        secret_file = tmp_path / "data" / "secret"
        secret = secret_file.read_text().strip()
        assert secret and secret_file.stat().st_mode & 0o077 == 0
        assert not any(secret in Path(f"/proc/{pid}/cmdline").read_text() for _, pid in children.values())
        # each logs to its file itself, rotated by size
        assert all("\0--log-file\0" in Path(f"/proc/{pid}/cmdline").read_text() for _, pid in children.values())
        assert "refused our credentials" in tinyci("status", "--dispatcher", addr).stderr
        auth = {"TINYCI_AUTH_SECRET_FILE": str(secret_file)}
        deadline = time.monotonic() + 90
        snapshot: dict = {}
        while time.monotonic() < deadline:
            done = tinyci("status", "--json", "--dispatcher", addr, **auth)
            assert done.returncode == 0, done.stderr
            snapshot = json.loads(done.stdout)
            if snapshot["builds"] and snapshot["builds"][-1]["status"] not in ("queued", "running"):
                break
            time.sleep(0.3)
        assert [b["status"] for b in snapshot["builds"]] == ["passed"], snapshot
        assert {r["name"] for r in snapshot["runners"]} == {"runner-1", "runner-2"}
        log = tinyci("log", "1", "--follow", "--dispatcher", addr, **auth)
        assert log.returncode == 0 and "1 passed" in log.stdout
    finally:
        code = run.stop()
    assert code == 0, run.proc.stderr.read()
    assert not any(pid_alive(pid) for _, pid in children.values())
    assert "dispatcher INFO" in (tmp_path / "data" / "logs" / "dispatcher.log").read_text()


@pytest.mark.slow
@needs_daemons
def test_up_reports_a_child_that_dies_and_stops_the_rest(tmp_path):
    run = Up(tmp_path, "--demo", "--port", "0", "--runners", "1")
    try:
        run.read_until("Press Ctrl-C")
        children = run.children()
        os.kill(children["runner-1"][1], signal.SIGKILL)
        code = run.proc.wait(30)
    finally:
        run.stop()
    err = run.proc.stderr.read()
    assert code == 1
    assert "runner-1" in err and "stopped unexpectedly" in err
    assert not any(pid_alive(pid) for _, pid in children.values())


@pytest.mark.slow
@needs_daemons
def test_up_with_a_runners_port_taken_names_that_runner_and_exits_1(tmp_path):
    # runner-2 fails while the others may still be starting: one clear report, no traceback
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if port < 10 or port > 65000:
            pytest.skip("ephemeral port out of range for this test")
        run = Up(tmp_path, "--demo", "--port", str(port - 2), "--runners", "2")   # runner-2 gets `port`
        try:
            code = run.proc.wait(30)
        finally:
            run.stop()
    err = run.proc.stderr.read()
    assert code == 1
    assert "runner-2" in err and "already in use" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_up_with_the_port_taken_shows_why_and_exits_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if port < 2 or port > 65000:
            pytest.skip("ephemeral port out of range for this test")
        run = Up(tmp_path, "--demo", "--port", str(port), "--runners", "1")
        try:
            code = run.proc.wait(30)
        finally:
            run.stop()
    err = run.proc.stderr.read()
    assert code == 1
    assert "dispatcher" in err and "already in use" in err
    assert "Traceback" not in err


def test_terminal_out_writes_plain_pieces_as_they_are_and_cleans_the_rest_the_same(tmp_path):
    """The fast path for plain pieces gives exactly what the sanitizer gives, whatever the pieces."""
    import io
    import random
    from ci.cli import TerminalOut
    from ci.sanitize import log_text
    rng = random.Random(16)
    alphabet = [b"plain text ", b"\n", b"\t", b"\x1b[31mred\x1b[0m", b"\x1b]0;title\x07", b"\r\n", b"\r",
                b"\xc3\xa9", b"\xe2\x80\xae", b"\x1b", b"[2J", b"\x00", b"\x7f", b"\xff"]
    for trial in range(200):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 6))))
        for colour in (False, True):
            raw = io.BytesIO()
            out = TerminalOut(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            out.stream.keep_colour = colour
            for a, b in zip([0, *cuts], [*cuts, len(data)]):
                out.write(data[a:b])
            out.close()
            assert raw.getvalue().decode() == log_text(data.decode(errors="replace"), colour), (trial, data, cuts)


def test_write_behind_keeps_the_order_and_raises_a_closed_pipe_in_the_caller():
    """`tinyci log` writes in a thread of its own: the pieces in order, the stream's end after them,
    and a reader gone (`tinyci log 3 | head`) is the caller's BrokenPipeError, at the next write or close."""
    import io
    from ci.cli import TerminalOut, WriteBehind
    raw = io.BytesIO()
    out = WriteBehind(TerminalOut(io.TextIOWrapper(raw, encoding="utf-8", newline="")))
    pieces = [f"line {n}\n".encode() for n in range(500)] + [b"\x1b[31mred"]
    for piece in pieces:
        out.write(piece)
    out.close()
    assert raw.getvalue().decode() == "".join(f"line {n}\n" for n in range(500)) + "red"

    class Gone(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise BrokenPipeError(32, "Broken pipe")
    out = WriteBehind(TerminalOut(io.TextIOWrapper(io.BufferedWriter(Gone()), encoding="utf-8")))
    with pytest.raises(BrokenPipeError):
        for _ in range(1000):       # bounded: the writer fails on the first piece
            out.write(b"x" * 10000 + b"\n")
        out.close()


def test_a_tool_run_as_the_process_skips_the_exit_collection_a_daemon_does_not():
    """gc.freeze at a tool's end (the interpreter's last collection then skips what
    start-up made); a daemon's exit keeps it, and a caller's main(argv) never freezes."""
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen' if gc.get_freeze_count() else 'not frozen', file=sys.stderr))\n"
            "from ci import cli\nsys.argv = ['tinyci', *sys.argv[1:]]\n"
            "code = cli.main() if sys.argv[1] != 'caller' else cli.main(['--version'])\n")
    for args, said in [(["--version"], "frozen"), (["dispatcher", "--help"], "not frozen"),
                       (["caller"], "not frozen")]:
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=TOOL_CWD,
                              timeout=30, env=child_env())
        assert done.stderr.strip().splitlines()[-1] == said, (args, done.stderr)
