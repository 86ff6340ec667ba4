"""No hostile text in anyone's terminal (issue 11, item 4).

A build prints escape sequences (OSC 52 to write the clipboard, a screen
clear, a carriage return and a cursor-up that would turn a line into a fake
``=== passed ===``, a concealed colour, C1 controls, a hyperlink, a bidi
override), a commit's subject and branch carry them, and runners register
with rich markup and escapes for a host. Against real daemons, the bytes
`tinyci log`, `tinyci status` and `tinyci console --once` write to a real
pseudo-terminal hold no escape but colour (SGR) where we draw it, no markup
is parsed, and the build's failure still reads as one; `tinyci log --raw`
gives the stored bytes; no daemon's own log holds a control character.
"""

from __future__ import annotations

import fcntl
import io
import logging
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

import pytest

from ci.daemon import PlainRecords
from conftest import ROOT, Repo, child_env
from test_sanitize import sgr_codes

SGR = re.compile(r"\x1b\[([0-9;]*)m")
C1_OR_BIDI = re.compile("[\x80-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
# every C0 control but tab and newline (a pty sends a newline as CR LF: those CRs are taken out first)
C0 = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
PTY_TIMEOUT = 60.0

MARKUP_HOST = "[link=file:///etc/passwd]x"
ESCAPE_HOST = "\x1b]52;c;cm0gLXJmIH4=\x07\x9b2Jevil-host\x1b[2J"
SUBJECT = "\x1b]52;c;cm0gLXJmIH4=\x07[bold red]x[/] \x1b[2J\x9b2J\u202eevil"
BRANCH = "feat/\u009b2J\u202eevil"
BUILD_SH = r"""printf 'step starts\n'
printf '\033]52;c;cm0gLXJmIH4=\007clipboard\n'
printf '\033[2J\033[Hcleared\n'
printf 'FAILED\r=== passed ===\n'
printf 'tests failed\n\033[1A\033[2K=== passed ===\n'
printf '\033[31mred\033[0m and \033[8mconcealed\n'
printf '\302\2332J c1 csi\n'
printf '\033]8;;file:///etc/passwd\033\\link\033]8;;\033\\\n'
printf '\342\200\256evil.txt\n'
printf 'last words \033]0;an unterminated title'
exit 1
"""


# ---------------------------------------------------------------- a terminal

def in_pty(argv: list[str], cols: int = 200, rows: int = 60, **env: str) -> tuple[int, bytes]:
    """Run `tinyci ARGV` with a pseudo-terminal of cols x rows as its stdin,
    stdout and stderr; its exit status and every byte it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "ci", *argv], stdin=slave, stdout=slave, stderr=slave,
                            env=child_env(TERM="xterm-256color", **env), cwd=ROOT, start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + PTY_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:                 # EIO: every writer of the slave side is gone
                break
            if not data:
                break
            out += data
        else:
            raise AssertionError(f"tinyci {' '.join(argv)} still writing after {PTY_TIMEOUT:g}s: {out[-500:]!r}")
        return proc.wait(10), out
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.close(master)


def screen_text(out: bytes, colour: bool) -> str:
    """What a terminal shows for ``out``, checked to be only text, newlines,
    tabs and (with ``colour``) safe SGR: no other escape, no OSC (clipboard,
    title, hyperlink), no C1 or bidi control, no carriage return but the pty's
    own before a newline, nothing that moves the cursor. Then each line shows
    exactly its characters, and the lines are those returned."""
    text = out.decode()                     # strictly UTF-8
    assert "\x1b]" not in text and "\x1bP" not in text, "an OSC or DCS string reached the terminal"
    for params in SGR.findall(text):
        assert colour, f"colour where none is drawn: {params!r}"
        assert not {"5", "8"} & set(sgr_codes(params)), f"blink or conceal: {params!r}"
    bare = SGR.sub("", text)
    assert "\x1b" not in bare, f"an escape that is not colour: {bare[bare.index(chr(27)):][:40]!r}"
    assert not C1_OR_BIDI.search(bare), f"a C1 or bidi control: {C1_OR_BIDI.search(bare)!r}"
    lines = bare.split("\r\n")
    assert not any(C0.search(line) for line in lines), [line for line in lines if C0.search(line)]
    return "\n".join(lines)


def colour_open_at(out: bytes, pos: int) -> bool:
    """Whether a colour set before ``pos`` is still in force there."""
    codes = [code for params in SGR.findall(out[:pos].decode()) for code in sgr_codes(params)]
    return bool(codes) and codes[-1] not in ("0", "")


# ---------------------------------------------------------------- the scene

@pytest.fixture
def scene(cluster, tmp_path):
    """A cluster whose build 1 (a hostile subject, on a hostile branch) printed
    hostile output and failed, and two runners registered with hostile hosts."""
    repo = Repo(tmp_path / "hostile-repo")
    repo.commit("initial", {"build.sh": "exit 0\n"})
    repo.git("checkout", "-q", "-b", BRANCH)
    sha = repo.commit(SUBJECT, {"build.sh": BUILD_SH})
    repo.git("checkout", "-q", "main")
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    builds = c.wait_builds(lambda b: any(x["sha"] == sha and x["status"] == "failed" for x in b),
                           "the hostile commit's build to fail")
    build = next(b for b in builds if b["sha"] == sha)
    assert build["branch"] == BRANCH and build["subject"] == SUBJECT      # the dispatcher holds them as sent
    for name, host in (("hostile", MARKUP_HOST), ("hostile-2", ESCAPE_HOST)):
        c.request({"type": "register", "name": name, "host": host, "port": 1, "labels": [], "slots": 1},
                  role="runner", id=name)
    return c, build["id"]


def test_tinyci_log_on_a_terminal_shows_text_and_colour_only_and_the_failure_stands(scene):
    c, build = scene
    code, out = in_pty(["log", str(build), "--dispatcher", c.disp.addr])
    assert code == 0, out
    shown = screen_text(out, colour=True)
    lines = shown.split("\n")
    # the carriage return and the cursor-up rewrote nothing: each line is still there, on its own
    for line in ("FAILED", "=== passed ===", "tests failed", "clipboard", "cleared", "link", "evil.txt",
                 " c1 csi", "last words "):
        assert line in lines, f"{line!r} not a line of its own in:\n{shown}"
    assert lines.index("FAILED") + 1 == lines.index("=== passed ===")
    assert "red and concealed" in lines                       # conceal dropped: the text shows
    assert "\x1b[31mred\x1b[0m" in out.decode()               # the colour the build chose stays
    # the dispatcher's verdict is its own line, in no colour the build left on
    verdict = next(line for line in lines if line.startswith("=== failed (exit 1)"))
    assert not colour_open_at(out, out.decode().index(verdict))
    assert not colour_open_at(out, len(out))


def test_tinyci_log_raw_is_the_stored_bytes_and_a_pipe_gets_no_escape_at_all(scene):
    c, build = scene
    stored = (c.tmp / "dispatcher" / "logs" / f"{build}.log").read_bytes()
    raw = subprocess.run([sys.executable, "-m", "ci", "log", str(build), "--raw", "--dispatcher", c.disp.addr],
                         capture_output=True, env=child_env(), cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == stored
    assert b"\x1b]52;c;" in stored and b"\r" in stored         # what was cleaned is really there
    piped = subprocess.run([sys.executable, "-m", "ci", "log", str(build), "--dispatcher", c.disp.addr],
                           capture_output=True, env=child_env(), cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
    assert piped.returncode == 0 and b"\x1b" not in piped.stdout
    assert b"\nFAILED\n=== passed ===\n" in piped.stdout


def test_tinyci_status_on_a_terminal_shows_markup_and_escapes_as_plain_text(scene):
    c, build = scene
    code, out = in_pty(["status", "--dispatcher", c.disp.addr])
    assert code == 0, out
    shown = screen_text(out, colour=True)
    assert f"{MARKUP_HOST}:1" in shown                         # the markup is text, not a link
    assert "file:///etc/passwd" not in out.decode().replace(f"{MARKUP_HOST}:1", "")
    assert "evil-host:1" in shown
    row = next(line for line in shown.split("\n") if re.match(rf"\s*{build}\s", line))
    assert "[bold red]x[/] evil" in row and "failed" in row and "feat/evil" in row, row


def test_tinyci_console_once_on_a_terminal_draws_only_plain_text(scene):
    c, build = scene
    code, out = in_pty(["console", "--once", "--follow", str(build), "--dispatcher", c.disp.addr], LINES="60")
    assert code == 0, out
    shown = screen_text(out, colour=False)
    assert f"{MARKUP_HOST}:1" in shown and "evil-host:1" in shown
    assert "[bold red]x[/] evil" in shown
    lines = [line.strip() for line in shown.split("\n")]
    assert f"Log of #{build} feat/evil" in shown
    # the cursor-up rewrote nothing; each line of the tail is the build's own or the dispatcher's
    assert "tests failed" in lines and "red and concealed" in lines
    assert any(line.startswith("=== failed (exit 1)") for line in lines), shown


def test_no_daemon_logs_a_control_character_a_peer_sent(scene):
    c, build = scene
    c.wait("the hostile runners to be declared dead (their hosts logged again)",
           lambda: c.runner_state("hostile") == "dead" and c.runner_state("hostile-2") == "dead")
    dispatcher_log = c.disp.log_path.read_text()
    # the hostile text was logged, made plain
    assert "[bold red]x[/] evil" in dispatcher_log and "evil-host" in dispatcher_log
    assert MARKUP_HOST in dispatcher_log and "feat/evil" in dispatcher_log
    for daemon in c.daemons:
        text = daemon.log_path.read_bytes().decode()
        assert "\x1b" not in text and not C1_OR_BIDI.search(text), f"{daemon.kind}:\n{daemon.log()}"
        assert not C0.search(text.replace("\n", "").replace("\t", "")), f"{daemon.kind}:\n{daemon.log()}"


# ---------------------------------------------------------------- a daemon's log records

def test_a_log_record_is_one_plain_line_and_a_traceback_keeps_its_lines():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(PlainRecords())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test_terminal.records")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        log.warning("build %d: %s", 3, "subject \x1b[2J\n12:00:00 dispatcher INFO build 3 passed\x9b2J")
        try:
            raise ValueError("a \x1b]52;c;eA==\x07b")
        except ValueError:
            log.exception("handling %s failed", "\x1b[1Arun")
        log.info("100%% of %s", "it")          # a message that is plain already is left as it is
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0] == "WARNING build 3: subject  12:00:00 dispatcher INFO build 3 passed"
    assert lines[1] == "ERROR handling run failed"
    assert lines[2] == "Traceback (most recent call last):"
    assert "ValueError: a b" in lines
    assert lines[-1] == "INFO 100% of it"
    assert not C0.search(out.getvalue().replace("\n", ""))
