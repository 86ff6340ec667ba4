"""The ``tinyci`` command: starts the daemons and talks to them.

Daemon subcommands (``dispatcher``, ``runner``, ``observer``, ``up``) hand
over to their module's ``add_arguments``/``main``; those modules are imported
only when their subcommand runs, so ``tinyci --help`` and the git hook's
``tinyci notify`` stay fast. Only the named command's parser is built, and a
tool imports what it uses where it uses it: a request, a log or an artifact
goes over a blocking socket (``blocking.BlockingLink``), so most commands start no
event loop (asyncio), and TLS, YAML (a config file) and hmac (a secret) are
imported only when configured.

Tool subcommands send, to the dispatcher: ``status``, ``build`` (``show``), ``read_log``, ``watch``,
``artifacts`` and ``fetch_artifact`` (role reader), ``trigger``, ``cancel``,
``rebuild``, ``drain``, ``resume``, ``forget`` and ``gc`` (role operator),
``run`` (trigger, then wait as a reader) and ``wait`` (``waiting``); to the
observer: ``poke`` (role observer). Without ``--dispatcher`` or a configured
address, a tool in or below a directory where `tinyci up` runs talks to its
daemons, with its secret (``local``). Every failure is one line on stderr:
exit 1 for an unreachable or refusing peer, 2 for bad configuration or usage.

What a peer sent reaches the terminal only through ``sanitize``: build logs
without control characters or escape sequences (colour kept on a terminal;
``log --raw`` gives the stored bytes), names, paths and error messages as
plain text. ``tinyci log`` reads on a blocking socket (``blocking.BlockingLink``,
no event loop) and writes in a thread of its own (``WriteBehind``), so that
receiving, checking and writing a big log overlap; each chunk stays in the
link's kept buffers until written. ``artifacts --get`` to a file (``-o``) or
to an output that is not a terminal has each chunk's bytes spliced from the
socket into it by the kernel where Linux can (``artifact_download.copy_to``);
to a terminal, each chunk is written from the link's buffer, cleaned.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import json
import os
import sys

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)
if TYPE_CHECKING:
    from typing import Any

from . import blocking, net, protocol
from .local import CEILING, LOCAL_SECRET, dial_host, find_up, secret_source, tool_secret, up_address

DESCRIPTION = """\
tinyci is a small self-hosted continuous-integration system made of three
daemons that talk over TCP: the observer watches a git clone and reports new
commits, the dispatcher queues them as builds and keeps all state, and the
runners check each commit out and run its build steps. `tinyci up` starts all
of them on this machine; to try it, run `tinyci up --demo`, make a commit in
the demo repository it creates, then watch with `tinyci status` and
`tinyci log 1 --follow`."""

EPILOG = "Run `tinyci COMMAND --help` for the flags of one command."

DAEMONS = {
    "dispatcher": "run the dispatcher: the queue, build records, logs and runner registry",
    "runner": "run a runner: registers with the dispatcher and runs the builds it is given",
    "observer": "run the observer: watches a git clone and reports new commits",
    "web": "run the web page: live builds and logs, history, badges, a JSON API and metrics",
}

# the configuration's defaults (config.py), for a tool that has no configuration to read
DEFAULT_OBSERVER = "127.0.0.1:8887"
DEFAULT_DISPATCHER = "127.0.0.1:8888"
# `tinyci up` writes the secret it made for its daemons here (under its default --data);
# tools run from the same directory use it when no secret is configured
NOTIFY_TIMEOUT = 3.0        # a git hook must not hold up a commit for long


def plain(text: str) -> str:
    """``sanitize.plain``, imported at first use: its expressions are compiled at import,
    and most commands print nothing a peer sent."""
    from .sanitize import plain as clean
    return clean(text)


class Failure(Exception):
    """A tool command failed; the message is printed as one line after "tinyci: "."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- parser

def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word
        if word == "--":
            return None
    return None


def _columns() -> int:
    """The width argparse takes from ``shutil.get_terminal_size``, found the same
    way ($COLUMNS, else the terminal's, else 80) without importing shutil: its
    archive modules cost every start some 7 ms, and argparse makes a formatter
    for each argument it adds, not only for help."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Width:
    """An argparse formatter's start, given ``_columns()``'s width."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position,       # type: ignore[call-arg]
                         _columns() - 2 if width is None else width)


class _Formatter(_Width, argparse.HelpFormatter):
    pass


class _RawFormatter(_Width, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, formatter_class: Any = _Formatter, **kwargs: Any):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. When ``command`` is one (the one named on the line), only its
    parser is built, with its flags (a daemon's: its module's, imported for
    them); otherwise (`tinyci --help`, a mistyped command) every command's,
    for the list and the error, without the daemons' flags. Building all of
    them cost every run of every command some 15 ms."""
    parser = _Parser(prog="tinyci", description=DESCRIPTION, epilog=EPILOG, formatter_class=_RawFormatter)
    parser.add_argument("--version", action=_VersionAction, help="print tinyci's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, add in COMMANDS.items():
        if command not in COMMANDS or name == command:
            built = add(sub, name)
            if name == command and name in (*DAEMONS, "up"):
                _daemon_module(name).add_arguments(built)
    return parser


def _up(sub, name: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help="start a dispatcher, an observer and N runners on this machine",
        description="Start a dispatcher, an observer and N runners on this machine, each as its own "
                    "process, and stop them all on Ctrl-C. Daemon logs go to DATA/logs/.")


def _daemon(sub, name: str) -> argparse.ArgumentParser:
    text = DAEMONS[name]
    return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")


# ---- commands that only read from the dispatcher (role reader)

def _status(sub, name: str) -> argparse.ArgumentParser:
    status = sub.add_parser(
        name, help="show runners and recent builds",
        description="Show the runners the dispatcher knows and its most recent builds.")
    _tool_arguments(status)
    status.add_argument("--limit", type=int, default=20, metavar="N",
                        help="how many recent builds to show (default 20)")
    status.add_argument("--json", action="store_true",
                        help='print one JSON object {"runners": [...], "builds": [...], "pipelines": [...], '
                             '"conditions": [...]} instead of tables')
    status.add_argument("-w", "--watch", action="store_true",
                        help="keep the tables on screen, redrawn as builds and runners change (Ctrl-C "
                             "stops); when the output is not a terminal, print a new table on each change")
    return status


def _console(sub, name: str) -> argparse.ArgumentParser:
    console = sub.add_parser(
        name, help="a live full-screen view of runners, the queue, builds and a build log",
        description="A live full-screen view of the dispatcher: runners, the queue and why each build "
                    "waits, recent builds, and the log of the newest running build, updated as events "
                    "arrive. Ctrl-C quits. When the output is not a terminal, it prints a plain "
                    "snapshot on each change instead.")
    _tool_arguments(console)
    console.add_argument("--follow", type=_build_id, metavar="BUILD",
                         help="show the log of this build (default: the newest running build)")
    console.add_argument("--once", action="store_true",
                         help="print one plain snapshot and exit (its size: $COLUMNS x $LINES, default 80x24)")
    return console


def _log(sub, name: str) -> argparse.ArgumentParser:
    log = sub.add_parser(
        name, help="print a build's log",
        description="Print a build's log. With --follow, keep printing as the build runs; the exit "
                    "code is then 0 when the build passed and 1 otherwise.")
    _tool_arguments(log)
    log.add_argument("build", type=_build_id, metavar="BUILD", help="build number")
    log.add_argument("-f", "--follow", action="store_true",
                     help="keep printing until the build finishes; exit 0 only if it passed")
    log.add_argument("-t", "--timestamps", action="store_true",
                     help="put before each line the time it reached the dispatcher (HH:MM:SS.mmm, local time)")
    log.add_argument("--raw", action="store_true",
                     help="print the log's bytes exactly as the dispatcher stored them, escape sequences "
                          "and all (by default control characters and escape sequences are removed, "
                          "colours kept only on a terminal)")
    return log


def _show(sub, name: str) -> argparse.ArgumentParser:
    show = sub.add_parser(
        name, help="show one build: its status, steps and test results",
        description="Show one build: commit, job, status, each step's exit and time, and the counts "
                    "and failed tests of its JUnit reports (the .ci.yaml `reports` globs).")
    _tool_arguments(show)
    show.add_argument("build", type=_build_id, metavar="BUILD", help="build number")
    show.add_argument("--json", action="store_true", help="print the build as the dispatcher sends it")
    return show


def _artifacts(sub, name: str) -> argparse.ArgumentParser:
    artifacts = sub.add_parser(
        name, help="list a build's artifacts, or fetch one",
        description="List the files a build uploaded (the .ci.yaml `artifacts` globs), or fetch one "
                    "with --get PATH (to stdout, or to FILE with -o). On a terminal, a fetched file is "
                    "shown as text without control characters; piped or with -o, it is the exact bytes.")
    _tool_arguments(artifacts)
    artifacts.add_argument("build", type=_build_id, metavar="BUILD", help="build number")
    artifacts.add_argument("--get", metavar="PATH", help="fetch this artifact (a path from the list)")
    artifacts.add_argument("-o", "--output", metavar="FILE", help="with --get: write it to FILE")
    return artifacts


# ---- commands that change what the dispatcher builds (role operator)

def _trigger(sub, name: str) -> argparse.ArgumentParser:
    trigger = sub.add_parser(
        name, help="queue a build of a branch head or a commit",
        description="Queue a build of a branch's head (--branch) or of a commit (REV), "
                    "even if that commit was built before.")
    _tool_arguments(trigger)
    what = trigger.add_mutually_exclusive_group()
    what.add_argument("--branch", metavar="NAME", help="build the head of this branch")
    what.add_argument("rev", nargs="?", metavar="REV", help="commit to build (sha, tag or branch)")
    trigger.add_argument("--repo", metavar="REPO",
                         help="the repository to build in, as the dispatcher knows it (needed when REV "
                              "is a commit in more than one)")
    return trigger


def _cancel(sub, name: str) -> argparse.ArgumentParser:
    cancel = sub.add_parser(name, help="cancel a queued or running build",
                            description="Cancel a queued or running build.")
    _tool_arguments(cancel)
    cancel.add_argument("build", type=_build_id, metavar="BUILD", help="build number")
    return cancel


def _rebuild(sub, name: str) -> argparse.ArgumentParser:
    rebuild = sub.add_parser(name, help="queue a new build of the same commit as BUILD",
                             description="Queue a new build of the commit BUILD built.")
    _tool_arguments(rebuild)
    rebuild.add_argument("build", type=_build_id, metavar="BUILD", help="build number")
    return rebuild


RUNNER_COMMANDS = {
    "drain": "take a runner out of service: it finishes what it runs and is given nothing new "
             "(shown as draining, then drained)",
    "resume": "give a drained runner work again",
    "forget": "remove a dead runner from the dispatcher's list (a live one is refused)",
}


def _runner_command(sub, name: str) -> argparse.ArgumentParser:
    text = RUNNER_COMMANDS[name]
    runner = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    _tool_arguments(runner)
    runner.add_argument("name", metavar="NAME", help="the runner's name, as `tinyci status` shows it")
    return runner


def _gc(sub, name: str) -> argparse.ArgumentParser:
    gc = sub.add_parser(
        name, help="delete old builds now, as the dispatcher's retention section says",
        description="Run a retention sweep now: delete the finished builds the dispatcher's `retention` "
                    "section says to (finished more than retention.days ago, or beyond the newest "
                    "retention.per_branch of their branch and job), with their logs and artifacts. Queued "
                    "and running builds, and the newest finished build of each branch and job, are kept. "
                    "With --dry-run, only say what a sweep would delete.")
    _tool_arguments(gc)
    gc.add_argument("--dry-run", action="store_true", help="say what a sweep would delete; delete nothing")
    return gc


# ---- `run` and `wait`: what scripts and other CIs call (exit 0 passed, 1 failed, 2 otherwise)

def _run(sub, name: str) -> argparse.ArgumentParser:
    run = sub.add_parser(
        name, help="build a commit now and wait for the verdict (for scripts and other CIs)",
        description="Queue builds of a commit (all its .ci.yaml jobs, or one with --job) and wait for all "
                    "of them, printing each one's verdict as it ends. Exit status: 0 when every build "
                    "passed, 1 when any failed, 2 on an error, a cancel, or a dispatcher that cannot be asked.")
    _tool_arguments(run)
    what = run.add_mutually_exclusive_group()
    what.add_argument("--branch", metavar="NAME", help="build the head of this branch")
    what.add_argument("rev", nargs="?", metavar="REV",
                      help="commit to build (sha, tag or branch; default HEAD of the watched clone)")
    run.add_argument("--repo", metavar="REPO", help="the repository REV is in, as the dispatcher knows it")
    run.add_argument("--job", metavar="JOB", help="only this job of the commit's .ci.yaml (of a matrix job, "
                                                  "'test' is every combination, 'test (python=3.11)' one)")
    _waiting_arguments(run)
    return run


def _wait(sub, name: str) -> argparse.ArgumentParser:
    wait = sub.add_parser(
        name, help="wait for builds already queued and print their verdicts",
        description="Wait for a build (by number) or for the newest build of each job of a commit (by "
                    "sha, at least 7 hex digits) to end. Exit status as for `tinyci run`.")
    _tool_arguments(wait)
    wait.add_argument("target", metavar="BUILD|SHA", help="a build number, or a commit's sha (7-40 hex digits)")
    _waiting_arguments(wait)
    return wait


def _waiting_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--follow", action="store_true",
                        help="print each build's log as it runs (one build after the other)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object {"builds": [...], "exit_code": N} at the end instead of lines')


# ---- the git hooks' side: poking the observer, and installing the hooks that do

def _notify(sub, name: str) -> argparse.ArgumentParser:
    notify = sub.add_parser(
        name, help="tell the observer to look for new commits now (for git hooks)",
        description="Tell the observer to look for new commits now instead of at its next poll. "
                    "Meant for a git post-commit or post-receive hook: it never fails, so it never "
                    "blocks a commit; a problem is one line on stderr and exit status 0.")
    notify.add_argument("--observer", metavar="HOST:PORT",
                        help=f"observer address (default: observer.host:port from the config, "
                             f"{DEFAULT_OBSERVER})")
    notify.add_argument("--branch", metavar="NAME", help="only this branch changed")
    notify.add_argument("--config", metavar="FILE",
                        help="YAML configuration file (default: $TINYCI_CONFIG, else built-in defaults)")
    notify.add_argument("--secret-file", metavar="FILE",
                        help=f"file holding the observer secret (default: the {LOCAL_SECRET} of a `tinyci up` run "
                             f"in this directory or one above)")
    return notify


def _install_hook(sub, name: str) -> argparse.ArgumentParser:
    hook = sub.add_parser(
        name, help="install git hooks that run `tinyci notify` after each commit and push",
        description="Install post-commit and post-receive hooks in a git clone that poke the observer "
                    "(`tinyci notify`), so a commit is seen at once instead of at the next poll. A hook "
                    "already there is kept and runs first; running this again only updates tinyci's hooks.")
    hook.add_argument("--repo", metavar="PATH", default=".", help="the clone the observer watches (default .)")
    hook.add_argument("--observer", metavar="HOST:PORT",
                      help=f"observer address the hooks poke (default: observer.host:port from the config, "
                           f"{DEFAULT_OBSERVER})")
    hook.add_argument("--config", metavar="FILE",
                      help="YAML configuration file the hooks read at each commit (for auth.secret)")
    hook.add_argument("--secret-file", metavar="FILE",
                      help=f"file holding the observer secret, read by the hooks at each commit "
                           f"(default: the {LOCAL_SECRET} of a `tinyci up` run in this directory or one above)")
    return hook


# every command, in the order `tinyci --help` lists them
COMMANDS = {"up": _up, **dict.fromkeys(DAEMONS, _daemon), "status": _status, "console": _console, "log": _log,
            "show": _show, "artifacts": _artifacts, "trigger": _trigger, "cancel": _cancel, "rebuild": _rebuild,
            **dict.fromkeys(RUNNER_COMMANDS, _runner_command), "gc": _gc, "run": _run, "wait": _wait,
            "notify": _notify, "install-hook": _install_hook}


def _tool_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dispatcher", metavar="HOST:PORT",
                        help="dispatcher address (default: dispatcher.host:port from the config, else "
                             "that of the `tinyci up` running in this directory or one above, else "
                             "127.0.0.1:8888)")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML configuration file (default: $TINYCI_CONFIG, else built-in "
                             "defaults); its auth section's secret for the role is used to "
                             "authenticate, else the .tinyci/secret of a `tinyci up` run in this "
                             "directory or one above")


def _build_id(text: str) -> int:
    if not text.lstrip("#").isdigit() or int(text.lstrip("#")) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a build number")
    return int(text.lstrip("#"))


class _VersionAction(argparse.Action):
    """--version, looked up only when asked: importlib.metadata costs every
    other command (the git hook's `tinyci notify` among them) ~25 ms."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"tinyci {_version()}")
        parser.exit()


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("tinyci")
    except Exception:  # running from a source tree that was never installed
        return "unknown"


def _daemon_module(name: str) -> Any:
    return importlib.import_module(f"ci.{name}")


# ---------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    if argv is None and _command_of(sys.argv[1:]) not in (*DAEMONS, "up"):
        # a tool as the process's own command (not a caller's), whose end is the interpreter's
        try:
            return _main(sys.argv[1:])
        finally:
            # the interpreter's last collection then skips every object start-up made (~20-30 ms
            # a tool run here); atexit, the streams' flush and module teardown still run. Not for
            # a daemon: what it leaves in a cycle may still have a finalizer to run.
            import gc
            gc.freeze()
    return _main(sys.argv[1:] if argv is None else list(argv))


def _main(argv: list[str]) -> int:
    command = _command_of(argv)
    try:
        parser = build_parser(command)
    except ImportError as exc:
        print(f"tinyci: cannot load the {command}: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command == "up":
        from . import up as up_module
        return up_module.main(args)
    if args.command in DAEMONS:
        return _daemon_module(args.command).main(args)
    if args.command == "notify":
        return notify(args)
    if args.command == "install-hook":
        return install_hook(args)
    try:
        return TOOLS[args.command](args)
    except Failure as exc:
        # the message may quote a peer (an error it sent): one plain line
        print(f"tinyci: {plain(str(exc))}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # whoever read our output stopped (`tinyci status --watch | head -1`): that ends the command,
        # quietly; stdout goes to /dev/null so the interpreter's last flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# ---------------------------------------------------------------- tools

class DispatcherLink:
    """What a tool needs to reach the dispatcher: address, secrets, limits, TLS,
    resolved once from the configuration (``settings.resolve``; its defaults
    when there is none) for the role the command speaks as: a reader's machine
    needs no operator secret."""

    OPERATOR_COMMANDS = frozenset({"trigger", "cancel", "rebuild", "drain", "resume", "forget", "run", "gc"})

    def __init__(self, args: argparse.Namespace):
        roles = [protocol.OPERATOR if args.command in self.OPERATOR_COMMANDS else protocol.READER]
        if args.command == "run":       # queues as the operator, then waits as a reader
            roles.append(protocol.READER)
        if configured(args):
            from .config import ConfigError, load
            from .settings import resolve
            try:
                self.settings = resolve(load(args.config), roles=roles, listens=False)
            except ConfigError as exc:
                raise Failure(f"configuration error: {exc}", 2) from None
            config = self.settings.config
            self.tls, self.limits = self.settings.client_tls, self.settings.limits
            addr = args.dispatcher or configured_addr(config, "dispatcher") or up_address("dispatcher") \
                or f"{dial_host(config.dispatcher.host)}:{config.dispatcher.port}"
        else:
            # every value is its default, known without loading the configuration
            # (its dataclasses cost each start some 15 ms)
            self.settings, self.tls, self.limits = None, None, net.Limits()
            addr = args.dispatcher or up_address("dispatcher") or DEFAULT_DISPATCHER
        self.secrets = {role: tool_secret(self.settings, role) for role in roles}
        try:
            self.host, self.port = net.parse_addr(addr)
        except ValueError as exc:
            raise Failure(f"--dispatcher: {exc}", 2) from None
        self.addr = f"{self.host}:{self.port}"

    def client(self, role: str) -> net.Client:
        return net.Client(self.host, self.port, role, self.secrets[role], self.limits, self.tls,
                          to=protocol.DISPATCHER_ID)

    def call(self, msg: dict, role: str = protocol.READER, timeout: float | None = None) -> dict:
        """One request on a blocking link of its own: a tool that asks once starts no event loop."""
        def ask() -> dict:
            link = self.link(role)
            try:
                return link.request(msg, timeout)
            finally:
                link.close()
        return self.run(ask)

    def refused(self, exc: Exception | None = None) -> str:
        if isinstance(exc, net.PeerNotProven):
            # it answered, but without our key: another daemon, or something posing as the dispatcher
            return (f"{exc} — check --dispatcher, and that its secret for this role is the one configured here")
        role = next(iter(self.secrets))
        return (f"the dispatcher at {self.addr} refused our credentials (we used "
                f"{secret_source(self.settings, role)}) — check that auth.secret "
                f"(TINYCI_AUTH_SECRET) or the role's own (auth.reader_secret, auth.operator_secret) "
                f"matches the dispatcher's; for `tinyci up`'s daemons, run this in or below the directory "
                f"where it ran, or set TINYCI_AUTH_SECRET_FILE")

    def link(self, role: str) -> blocking.BlockingLink:
        """A blocking link (no event loop): for one request, and for `tinyci log` and
        `artifacts --get`, whose chunks it receives into buffers it keeps."""
        return blocking.BlockingLink(self.addr, role, self.secrets[role], self.limits, self.tls,
                                     to=protocol.DISPATCHER_ID)

    def run(self, coro) -> Any:
        """Run one coroutine (or call a function: work on a blocking ``link``),
        turning every peer problem into a one-line Failure."""
        try:
            if callable(coro):
                return coro()
            import asyncio      # not at the top: `tinyci notify` must not pay for it
            return asyncio.run(coro)
        except protocol.RemoteError as exc:
            if exc.code == "auth_failed":
                raise Failure(self.refused()) from None
            raise Failure(exc.message or exc.code) from None
        except net.PeerAuthFailed as exc:
            raise Failure(self.refused(exc)) from None
        except net.PeerError as exc:
            raise Failure(unreachable("dispatcher", self.addr, exc)
                          + " — is it running? (tinyci up / tinyci dispatcher)") from None
        except protocol.ProtocolError as exc:
            raise Failure(f"the dispatcher at {self.addr} sent something unexpected: {exc.message}") from None


def configured(args: argparse.Namespace) -> bool:
    """A configuration file (--config, $TINYCI_CONFIG) or a TINYCI_* variable is
    given: without one a tool takes the defaults and reads no configuration."""
    return bool(args.config) or any(name.startswith("TINYCI_") and name != CEILING for name in os.environ)


def configured_addr(config: Any, section: str) -> str | None:
    """HOST:PORT of ``section`` when the configuration (file or environment) sets it, else None:
    then a running `tinyci up` above this directory says where its daemon is."""
    if f"{section}.host" in config.origins or f"{section}.port" in config.origins:
        cfg = getattr(config, section)
        return f"{dial_host(cfg.host)}:{cfg.port}"
    return None


def unreachable(what: str, addr: str, exc: Exception) -> str:
    if isinstance(exc, net.PeerRefused):
        why = "connection refused"
    elif isinstance(exc, net.PeerTimeout):
        why = "timed out"
    else:
        why = str(exc)
    return f"cannot reach the {what} at {addr} ({why})"


def status(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 10_000:
        raise Failure("--limit must be between 1 and 10000", 2)
    dispatcher = DispatcherLink(args)
    if args.watch:
        if args.json:
            raise Failure("--watch and --json cannot be used together", 2)
        from . import console as live
        return live.main(dispatcher, view="status")
    reply = dispatcher.call({"type": "status", "limit": args.limit})
    snapshot = {"runners": reply.get("runners", []), "builds": reply.get("builds", []),
                "pipelines": reply.get("pipelines", []), "conditions": reply.get("conditions", [])}
    if args.json:
        print(json.dumps(snapshot, indent=2))
        return 0
    import time
    from rich.console import Console
    from . import tui
    console = Console()
    console.print(tui.render_status(snapshot, time.time(), console.width))
    return 0


# A followed log can stay silent for as long as a build step or the queue
# takes; after this long without a frame we reconnect and resume at our offset
# rather than wait on a connection that may be dead.
FOLLOW_IDLE = 60.0


# What a log may hold that needs no cleaning at all: printable ASCII, newline, tab.
_PLAIN = bytes(range(0x20, 0x7f)) + b"\n\t"


class TerminalOut:
    """Where a peer's text goes: ``raw``, its exact bytes; else through a
    ``sanitize.LogStream``, keeping colour only on a terminal (and not with
    NO_COLOR). ``close`` writes what the stream held back.

    A piece that is plain (``_PLAIN`` only), arriving when neither the
    decoder nor the stream holds anything back and no colour is on, is
    written as it is: the stream would return it unchanged, and checking
    that costs one C pass where cleaning costs several regular expressions
    (a 100 MiB log reads back ~10x faster)."""

    holds = 0       # pieces it keeps after ``write`` returns

    def __init__(self, out, raw: bool = False):
        self.out = out
        self.raw = raw
        colour = out.isatty() and not os.environ.get("NO_COLOR")
        if raw:
            self.stream = None
        else:
            from .sanitize import LogStream
            self.stream = LogStream(keep_colour=colour)
        # a character cut in two between pieces is decoded whole
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> None:
        self.emit(self.clean(data))

    def clean(self, data: bytes) -> bytes | str:
        """What ``data`` becomes: bytes to write as they are (raw, or plain), or
        the cleaned text. Keeps the stream's state: pieces go through in order."""
        if self.raw or self._plain(data):
            return data
        return self.stream.feed(self.decoder.decode(data))

    def emit(self, piece: bytes | str) -> None:
        """Write what ``clean`` made of a piece."""
        if isinstance(piece, str):
            self.out.write(piece)
        else:
            self.out.flush()            # what the text layer holds goes first
            self.out.buffer.write(piece)
        self.out.flush()

    def _plain(self, data: bytes) -> bool:
        stream = self.stream
        return (hasattr(self.out, "buffer") and not stream.held and not stream.coloured
                and not self.decoder.getstate()[0] and not data.translate(None, _PLAIN))

    def close(self) -> None:
        if self.stream is not None:
            self.out.write(self.stream.feed(self.decoder.decode(b"", final=True)) + self.stream.end())
        self.out.flush()


class WriteBehind:
    """Writes to a ``TerminalOut`` in a thread of its own: a piece is checked
    (``clean``, in the caller's thread) while the one before is written
    (``emit``, here), and the next one is received meanwhile (the socket's read
    and the file's write leave the GIL, so the three overlap). At most two
    pieces wait; a failure to write (a closed pipe) is raised at the next
    ``write`` or at ``close``."""

    WAITING = 2
    holds = WAITING + 1     # pieces it keeps after ``write`` returns: those waiting, and the one written

    def __init__(self, out: TerminalOut):
        import queue
        import threading
        self.out = out
        self.pieces: Any = queue.Queue(maxsize=self.WAITING)
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._write_all, name="log-writer", daemon=True)
        self.thread.start()

    def _write_all(self) -> None:
        while (piece := self.pieces.get()) is not None:
            if self.failed is None:
                try:
                    self.out.emit(piece)
                except BaseException as exc:      # raised in the main thread
                    self.failed = exc

    def write(self, data: bytes) -> None:
        if self.failed is not None:
            raise self.failed
        self.pieces.put(self.out.clean(data))

    def close(self) -> None:
        self.pieces.put(None)
        self.thread.join()
        if self.failed is not None:
            raise self.failed
        self.out.close()


def show_log(args: argparse.Namespace) -> int:
    dispatcher = DispatcherLink(args)
    out = WriteBehind(TerminalOut(sys.stdout, args.raw))
    try:
        try:
            final = dispatcher.run(lambda: copy_log(dispatcher, args.build, args.follow, out,
                                                    getattr(args, "timestamps", False)))
        finally:
            out.close()         # a colour the log left on is reset, even on Ctrl-C
    except BrokenPipeError:  # `tinyci log 3 | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.follow:
        if final != "passed":
            print(f"tinyci: build {args.build} {plain(final or 'ended without a status')}", file=sys.stderr)
        return 0 if final == "passed" else 1
    return 0


class LogCopy:
    """Where a log read with ``read_log`` has got to: each chunk's new bytes go
    to ``out`` (after their times, with a ``Stamper``); a reconnect asks from there."""

    def __init__(self, build: int, follow: bool, out: TerminalOut | WriteBehind, timestamps: bool = False):
        self.build, self.follow, self.out = build, follow, out
        self.offset = 0
        self.stamper = Stamper() if timestamps else None

    def request(self) -> dict:
        # binary: the log's bytes as they are, in bulk frames (no JSON escaping, big blocks)
        request = {"type": "read_log", "build": self.build, "offset": self.offset, "follow": self.follow,
                   "binary": True}
        if self.stamper is not None:
            request["timestamps"] = True
        return request

    def chunk(self, frame: dict) -> None:
        data = frame["data"]
        if isinstance(data, str):       # the table allows text too
            data = data.encode()
        # the dispatcher may resend from an earlier offset: print only what is new
        skip = max(0, self.offset - frame["offset"])
        if skip < len(data):
            new = data[skip:] if skip else data
            if self.stamper is not None:
                self.stamper.times(frame.get("times") or [])
                self.out.write(self.stamper.stamp(self.offset, new))
            else:
                self.out.write(new)
        self.offset = max(self.offset, frame["offset"] + len(data))


def copy_log(dispatcher: DispatcherLink, build: int, follow: bool, out: TerminalOut | WriteBehind,
             timestamps: bool = False) -> str | None:
    """Write build ``build``'s log to ``out`` (to its end with ``follow``); returns its
    status. ``timestamps``: each line after the time it reached the dispatcher
    (``Stamper``). On a blocking link (``blocking.BlockingLink``): asyncio's stream
    reader copied each byte of a chunk three times and paused every 128 KiB,
    which made most of `tinyci log`'s time on a big log after its start-up."""
    copy = LogCopy(build, follow, out, timestamps)
    while True:
        link = None
        try:
            link = dispatcher.link(protocol.READER)
            # a chunk's bytes stay in the link's buffers, one more than ``out`` may hold: no copy
            for frame in link.stream(copy.request(), idle=FOLLOW_IDLE if follow else None, kept=out.holds + 1):
                if frame["type"] == "chunk":
                    copy.chunk(frame)
                elif frame["type"] == "end":
                    return frame["status"]
            return None
        except net.PeerTimeout:
            if not follow:
                raise
        finally:
            if link is not None:
                link.close()


class Stamper:
    """Puts before each log line the time its first byte reached the dispatcher,
    from the (offset, time) pairs the dispatcher sends with each chunk."""

    def __init__(self):
        self.known: list[tuple[int, float]] = []
        self.at_line_start = True

    def times(self, pairs: list) -> None:
        for offset, when in pairs:
            if not self.known or offset > self.known[-1][0]:
                self.known.append((offset, when))

    def when(self, offset: int) -> float | None:
        import bisect
        i = bisect.bisect_right(self.known, (offset, float("inf"))) - 1
        return self.known[i][1] if i >= 0 else None

    def stamp(self, offset: int, data: bytes) -> bytes:
        import time
        out = bytearray()
        for piece in data.splitlines(keepends=True):
            if self.at_line_start:
                when = self.when(offset)
                stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}" \
                    if when is not None else " " * 12
                out += f"{stamp} ".encode()
            out += piece
            offset += len(piece)
            self.at_line_start = piece.endswith(b"\n")
        return bytes(out)


def artifacts(args: argparse.Namespace) -> int:
    dispatcher = DispatcherLink(args)
    if args.output and not args.get:
        raise Failure("artifacts: -o FILE goes with --get PATH", 2)
    if not args.get:
        listed = dispatcher.call({"type": "artifacts", "build": args.build})["artifacts"]
        if not listed:
            print(f"build {args.build} has no artifacts")
        for item in listed:
            print(f"{item['size']:>12}  {plain(str(item['path']))}")
        return 0

    def fetch(out) -> None:
        from .artifact_download import copy_to
        link = dispatcher.link(protocol.READER)
        try:
            copy_to(link, args.build, args.get, out)
        finally:
            link.close()

    if args.output:
        tmp = f"{args.output}.part"
        try:
            with open(tmp, "wb") as out:
                dispatcher.run(lambda: fetch(out.fileno()))
            os.replace(tmp, args.output)
        except OSError as exc:
            raise Failure(f"cannot write {args.output}: {exc.strerror}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        print(f"build {args.build}: {args.get} -> {args.output}")
    elif (fd := raw_stdout()) is not None:
        try:
            dispatcher.run(lambda: fetch(fd))
        except BrokenPipeError:
            raise               # `| head`: main's quiet end
        except OSError as exc:  # the output's own (a full disk behind `> file`), as -o says it
            raise Failure(f"cannot write the standard output: {exc.strerror}") from None
    else:
        out = TerminalOut(sys.stdout, raw=not sys.stdout.isatty())
        try:
            dispatcher.run(lambda: fetch(out))
        finally:
            out.close()
    return 0


def raw_stdout() -> int | None:
    """Standard output's file descriptor when it is not a terminal (a file or a
    pipe: bytes go there as they are, by splice where Linux can), else None."""
    if sys.stdout.isatty():
        return None
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):     # replaced by an object without one
        return None
    sys.stdout.flush()
    return fd


def trigger(args: argparse.Namespace) -> int:
    msg: dict = {"type": "trigger"}
    if args.branch:
        msg["branch"] = args.branch
    elif args.rev:
        msg["rev"] = args.rev
    else:
        raise Failure("trigger: say what to build: --branch NAME or a REV (e.g. tinyci trigger HEAD)", 2)
    if args.repo:
        msg["repo"] = args.repo
    reply = DispatcherLink(args).call(msg, protocol.OPERATOR)
    return _print_builds(reply, "queued")


def cancel(args: argparse.Namespace) -> int:
    reply = DispatcherLink(args).call({"type": "cancel", "build": args.build, "by": _who()}, protocol.OPERATOR)
    return _print_builds(reply, "cancelled")


def _who() -> str:
    """user@host, for the cancelled build's log."""
    import getpass
    import socket
    try:
        user = getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"[:200]


def console(args: argparse.Namespace) -> int:
    from . import console as live
    return live.main(DispatcherLink(args), follow=args.follow, once=args.once)


def rebuild(args: argparse.Namespace) -> int:
    reply = DispatcherLink(args).call({"type": "rebuild", "build": args.build}, protocol.OPERATOR)
    return _print_builds(reply, "queued")


def runner_command(args: argparse.Namespace) -> int:
    """drain, resume, forget NAME."""
    reply = DispatcherLink(args).call({"type": args.command, "name": args.name}, protocol.OPERATOR)
    name = plain(args.name)
    if args.command == "forget":
        print(f"runner {name} forgotten")
        return 0
    runner = reply["runner"]
    state = plain(str(runner.get("state", "")))
    running = ", ".join(f"#{plain(str(b))}" for b in runner.get("running") or [])
    if state == "draining":
        print(f"runner {name} draining: it finishes {running} and takes nothing new")
    elif state == "dead":
        print(f"runner {name} is dead; it {'stays drained' if args.command == 'drain' else 'takes work'} "
              f"when it comes back")
    else:
        print(f"runner {name} {state}")
    return 0


GC_TIMEOUT = 600.0          # seconds a sweep of a long history may take before the reply


def gc(args: argparse.Namespace) -> int:
    reply = DispatcherLink(args).call({"type": "gc", "dry_run": args.dry_run}, protocol.OPERATOR, GC_TIMEOUT)
    days, per_branch = reply["days"], reply["per_branch"]
    if not days and not per_branch:
        print("retention is off (retention.days and retention.per_branch are 0 in the dispatcher's "
              "configuration): nothing to delete")
        return 0
    policy = ", ".join(part for part in (f"older than {days:g} day(s)" if days else "",
                                         f"beyond the newest {per_branch} per branch and job" if per_branch else "")
                       if part)
    what = (f"{reply['builds']} finished build(s) {policy}: {_bytes(reply['log_bytes'])} of logs, "
            f"{_bytes(reply['artifact_bytes'])} of artifacts")
    if args.dry_run:
        print(f"a sweep would delete {what}")
    else:
        print(f"deleted {what}" + (f"; the database gave back {_bytes(reply['db_bytes'])}"
                                   if reply.get("db_bytes") else ""))
    return 0


def _bytes(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    return f"{n} bytes"


def _print_builds(reply: dict, verb: str) -> int:
    builds = reply.get("builds") or []
    if not builds:
        print(f"no build {verb}")
    for build in builds:
        print(f"build {plain(str(build))} {verb}")
    return 0


def run_builds(args: argparse.Namespace) -> int:
    msg: dict = {"type": "trigger"}
    if args.branch:
        msg["branch"] = args.branch
    else:
        msg["rev"] = args.rev or "HEAD"
    for key in ("repo", "job"):
        if getattr(args, key) is not None:
            msg[key] = getattr(args, key)
    dispatcher = DispatcherLink(args)
    try:
        ids = dispatcher.call(msg, protocol.OPERATOR)["builds"]
    except Failure as exc:
        raise Failure(str(exc), 2) from None
    if not args.json:
        for build in ids:
            print(f"build {build} queued", flush=True)
    return _wait_for(dispatcher, ids, args)


def wait_builds(args: argparse.Namespace) -> int:
    from . import waiting
    target = args.target.lstrip("#")
    dispatcher = DispatcherLink(args)
    if target.isdigit() and len(target) < 7:
        ids = [int(target)]
    elif 7 <= len(target) <= 40 and all(c in "0123456789abcdef" for c in target.lower()):
        try:
            ids = dispatcher.run(waiting.commit_builds(lambda: dispatcher.client(protocol.READER), target.lower()))
        except waiting.WaitError as exc:
            raise Failure(str(exc), 2) from None
        except Failure as exc:
            raise Failure(str(exc), 2) from None
    else:
        raise Failure(f"wait: {args.target!r} is neither a build number nor a commit's sha (7-40 hex digits)", 2)
    return _wait_for(dispatcher, ids, args)


def _wait_for(dispatcher: DispatcherLink, ids: list[int], args: argparse.Namespace) -> int:
    """Wait for builds ``ids``, printing each verdict (and with --follow each log) as
    it ends; the exit code of ``waiting.exit_code``. A failure to ask is exit 2."""
    from . import waiting
    if not ids:
        raise Failure("no build was queued", 2)
    connect = lambda: dispatcher.client(protocol.READER)     # noqa: E731
    tell = (lambda build: None) if args.json else (lambda build: print(waiting.verdict_line(build), flush=True))
    try:
        if args.follow and not args.json:
            ended = {}
            for build in sorted(ids):
                out = TerminalOut(sys.stdout)
                try:
                    dispatcher.run(lambda: copy_log(dispatcher, build, True, out))
                finally:
                    out.close()
                ended.update(dispatcher.run(waiting.Waiter(connect, [build], tell).run()))
        else:
            ended = dispatcher.run(waiting.Waiter(connect, ids, tell).run())
    except Failure as exc:
        raise Failure(str(exc), 2) from None
    code = waiting.exit_code(b["status"] for b in ended.values())
    if args.json:
        print(json.dumps({"builds": [ended[i] for i in sorted(ended)], "exit_code": code}, indent=2))
    return code


def show_build(args: argparse.Namespace) -> int:
    build = DispatcherLink(args).call({"type": "build", "build": args.build})["build"]
    if args.json:
        print(json.dumps(build, indent=2))
        return 0
    from . import reports
    job = f" job {build['job']}" if build.get("job") else ""
    print(plain(f"build {build['id']}{job}: {build['status']}  {build.get('branch', '')} "
                f"{str(build.get('sha', ''))[:12]} {build.get('subject', '')}"))
    for number, step in enumerate(build.get("steps") or [], 1):
        ended = "timed out or did not start" if step["exit_code"] is None else f"exit {step['exit_code']}"
        print(plain(f"  step {number}: {step['name'] or step['run']}: {ended} in {step['duration']:.2f}s"))
    tests = build.get("tests")
    if tests:
        print(f"tests: {reports.summary(tests)}")
        for name in tests["failures"]:
            print(plain(f"  FAILED {name}"))
        unnamed = tests["failed"] + tests["errors"] - len(tests["failures"])
        if unnamed > 0:
            print(f"  ... and {unnamed} more")
    return 0


TOOLS = {"status": status, "show": show_build, "log": show_log, "artifacts": artifacts, "trigger": trigger, "cancel": cancel,
         "rebuild": rebuild, "console": console, "drain": runner_command, "resume": runner_command,
         "forget": runner_command, "gc": gc}
TOOLS.update(run=run_builds, wait=wait_builds)


# ---------------------------------------------------------------- notify

def notify(args: argparse.Namespace) -> int:
    """Poke the observer. Always exits 0: a git hook must never fail a commit."""
    try:
        addr, secret, tls = _observer_target(args)
        limits = net.Limits(connect_timeout=NOTIFY_TIMEOUT, read_timeout=NOTIFY_TIMEOUT)
        msg: dict = {"type": "poke"}
        if args.branch:
            msg["branch"] = args.branch
        blocking.request_blocking(addr, msg, protocol.OBSERVER, secret, limits, ssl=tls, to=protocol.OBSERVER_ID)
    except net.PeerAuthFailed as exc:
        print(f"tinyci notify: the observer {exc} (auth.observer_secret / auth.secret)", file=sys.stderr)
    except net.PeerError as exc:
        print(f"tinyci notify: {unreachable('observer', addr, exc)}; it will see the commit "
              f"at its next poll if it runs", file=sys.stderr)
    except protocol.RemoteError as exc:
        print(f"tinyci notify: the observer refused the poke: {exc.message or exc.code}", file=sys.stderr)
    except Exception as exc:  # config errors, bad addresses, anything: report, never fail
        print(f"tinyci notify: {exc}", file=sys.stderr)
    return 0


def install_hook(args: argparse.Namespace) -> int:
    from pathlib import Path
    from . import hooks
    try:
        addr, _, _ = _observer_target(args)
        host, port = net.parse_addr(addr)
    except Exception as exc:    # a config error or a bad address, said in one line
        print(f"tinyci install-hook: {exc}", file=sys.stderr)
        return 2
    config = os.path.abspath(args.config) if args.config else None
    # hooks run inside the clone, not here: name the secret `tinyci up` made here by its full path
    secret_file = args.secret_file
    if not secret_file and not config:
        up = find_up()
        secret_file = str(up.secret_path) if up is not None and up.secret else None
    secret_file = os.path.abspath(secret_file) if secret_file else None
    try:
        for line in hooks.install(Path(args.repo).absolute(), f"{host}:{port}", config, secret_file):
            print(line)
    except hooks.HookError as exc:
        print(f"tinyci install-hook: {exc}", file=sys.stderr)
        return 1
    return 0


def _observer_target(args: argparse.Namespace) -> tuple[str, str, Any]:
    """(address, secret, TLS context). The configuration (and its YAML import) is
    read only when there is one, keeping the hook's common case quick."""
    secret_file = getattr(args, "secret_file", None)
    if configured(args):
        from .config import load
        from .settings import resolve
        # an explicit --secret-file wins: the configured secret is then not read at all
        settings = resolve(load(args.config), roles=[] if secret_file else [protocol.OBSERVER], listens=False)
        observer = settings.config.observer
        addr = args.observer or configured_addr(settings.config, "observer") or up_address("observer") \
            or f"{dial_host(observer.host)}:{observer.port}"
        return addr, tool_secret(settings, protocol.OBSERVER, secret_file), settings.client_tls
    addr = args.observer or up_address("observer") or DEFAULT_OBSERVER
    return addr, tool_secret(None, protocol.OBSERVER, secret_file), None
