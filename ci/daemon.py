"""What every daemon shares: common flags, the configuration resolved once
(``load_config`` -> ``settings.Settings``; a daemon started by hand below a
`tinyci up` takes its secret and dispatcher, ``up_defaults``), logging (every
record made plain text: ``PlainRecords``; with ``--log-file``, to a file
rotated by size, ``RotatingLog``), the ready line, signal handling, and
start-up errors printed as one line instead of a traceback."""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import logging.handlers
import os
import re
import signal
import stat
import sys
from dataclasses import fields
from typing import Any, Awaitable, Callable, Iterable, Mapping

from . import local
from .config import AuthConfig, Config, ConfigError, load
from .sanitize import log_text, plain
from .settings import Settings, resolve


class StartupError(Exception):
    """A daemon cannot start; the message names what is wrong and is printed as is."""


def add_common_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML configuration file (default: $TINYCI_CONFIG, else built-in defaults)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int,
                        help=f"port to listen on; 0 picks a free one (default {default_port})")
    parser.add_argument("--insecure", action="store_true",
                        help="listen on a non-loopback --host even though some role has no secret "
                             "(anyone who reaches the port can then act in that role)")
    add_logging_arguments(parser)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    parser.add_argument("--log-file", metavar="FILE",
                        help=f"log to FILE instead of stderr, rotated when it reaches {LOG_MAX_BYTES >> 20} MiB "
                             f"(the last {LOG_BACKUPS} kept as FILE.1 ... FILE.{LOG_BACKUPS})")


def load_config(args: argparse.Namespace, overrides: Mapping[str, Mapping[str, Any]],
                roles: Iterable[str]) -> Settings:
    """The configuration (file, environment, then ``overrides`` from flags),
    resolved for a daemon that accepts or uses ``roles``: secret and TLS files
    are read now, so a bad one fails at start-up."""
    try:
        config = load(args.config, overrides=overrides)
        below_up = up_defaults(config)
        if below_up:
            config = load(args.config, overrides=_merged(below_up, overrides))
        return resolve(config, roles=roles)
    except ConfigError as exc:
        raise StartupError(f"configuration error: {exc}") from None


def up_defaults(config: Config) -> dict[str, dict[str, Any]]:
    """What a daemon started by hand in (or below) a `tinyci up` directory takes
    from it, for the keys nothing else sets: up's secret when no secret is
    configured at all, up's dispatcher, and for a runner a free port (up's
    runners hold the ones after the dispatcher's)."""
    up = local.find_up()
    if up is None:
        return {}
    found: dict[str, dict[str, Any]] = {}
    if up.secret and not any(getattr(config.auth, f.name) for f in fields(AuthConfig)):
        found["auth"] = {"secret": up.secret}
    if up.addrs.get("dispatcher"):
        for section in ("runner", "observer"):
            if f"{section}.dispatcher" not in config.origins:
                found.setdefault(section, {})["dispatcher"] = up.addrs["dispatcher"]
    if "runner.port" not in config.origins:
        found.setdefault("runner", {})["port"] = 0
    return found


def _merged(low: Mapping[str, Mapping[str, Any]], high: Mapping[str, Mapping[str, Any]]) -> dict:
    """``high`` over ``low``, key by key; a None in ``high`` (a flag not given) does not count."""
    out = {section: dict(keys) for section, keys in low.items()}
    for section, keys in high.items():
        for key, value in keys.items():
            if value is not None:
                out.setdefault(section, {})[key] = value
    return out


# What anyone who reaches a daemon's port could do without secrets, for the refusal and the warning.
EXPOSES = {
    "dispatcher": "read every build and its log, queue and cancel builds, and register as a runner "
                  "to be sent the repository's commits and build commands",
    "runner": "run any shell command on this machine as this user",
    "observer": "make it scan the repository at will",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False        # a name, or "" (every interface): assume it is reachable from outside


def check_exposure(what: str, host: str, settings: Settings, roles: Iterable[str], insecure: bool) -> None:
    """Refuse a non-loopback address while a role this daemon accepts has no
    secret, unless ``insecure``; then only warn, saying what is exposed."""
    if is_loopback(host):
        return
    open_roles = sorted(role for role in roles if settings.is_open(role))
    if not open_roles:
        return
    who = ", ".join(open_roles)
    if not insecure:
        raise StartupError(
            f"refusing to listen on {host or 'every interface'}: no secret is set for role(s) {who}, "
            f"so anyone who can reach this port could {EXPOSES[what]}. Set auth.secret (or "
            f"auth.<role>_secret, e.g. TINYCI_AUTH_SECRET_FILE), listen on 127.0.0.1, or pass "
            f"--insecure to accept the risk")
    logging.getLogger(f"ci.{what}").warning(
        "--insecure: listening on %s with no secret for role(s) %s: anyone who can reach this port "
        "can %s", host or "every interface", who, EXPOSES[what])


class PlainRecords(logging.Filter):
    """Log records as plain text: a message often quotes a peer (a subject,
    a branch, a runner's host, an error it sent), and an escape sequence in it
    would reach whoever reads the log in a terminal, a newline would forge a
    line of its own. So each message is ``sanitize.plain`` (one line, no
    controls); a traceback keeps its lines, without control characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        # the message made once: the formatter asks for it again, and finds it made
        try:
            message = record.getMessage()
        except Exception:       # a bad format: left to the handler, which reports it (handleError)
            return True
        record.msg, record.args = plain(message), None
        if record.exc_info and not record.exc_text:
            # formatted here, as the handler's formatter would, so that it can be cleaned
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = log_text(record.exc_text)
        if record.stack_info:
            record.stack_info = log_text(record.stack_info)
        return True


class _Stamped(logging.Formatter):
    """The time of a record to the second, formatted once a second, not for
    each record (the dispatcher writes one or two a build, hundreds a second)."""

    _second, _text = -1, ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:      # under the handler's lock
            self._second, self._text = second, super().formatTime(record, datefmt)
        return self._text


LOG_MAX_BYTES = 10 << 20     # a daemon's log file is rotated at this size
LOG_BACKUPS = 3              # rotated files kept


class RotatingLog(logging.handlers.RotatingFileHandler):
    """A daemon's log file, rotated by size (FILE -> FILE.1 -> ... -> FILE.N).

    When the process's stderr is that same file (`tinyci up` points its
    children's stderr at their log, to catch what is printed before logging
    starts and after it ends), stderr follows each rotation to the new file,
    so that nothing keeps growing a rotated file, or one already deleted."""

    def __init__(self, path: str, max_bytes: int | None = None, backups: int | None = None):
        super().__init__(path, maxBytes=max_bytes or LOG_MAX_BYTES, backupCount=backups or LOG_BACKUPS,
                         encoding="utf-8")
        self.follow_stderr = _same_file(2, self.stream.fileno())
        self.lost = 0               # records that could not be written (the disk full), said once it can

    def _open(self):
        stream = super()._open()
        self.regular = stat.S_ISREG(os.fstat(stream.fileno()).st_mode)     # never rotate /dev/null or a fifo
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        if self.lost:           # the file takes records again: first say what is missing
            lost, self.lost = self.lost, 0
            self._write(logging.makeLogRecord({
                "name": "ci.daemon", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"{lost} log record(s) were lost here: the log file could not be written"}))
            if self.lost:       # not yet: the note was not written either
                self.lost = lost
        self._write(record)

    def _write(self, record: logging.LogRecord) -> None:
        # Python 3.11's RotatingFileHandler.emit (shouldRollover, then StreamHandler.emit)
        # formats each record twice and asks the file system twice whether the log is a
        # regular file (the dispatcher writes a line or two per build): here once each.
        # The size is the file's end (seek), not our position: logrotate's copytruncate may cut it
        try:
            text = self.format(record) + self.terminator
            if self.stream is None:
                self.stream = self._open()
            if self.regular and self.stream.seek(0, os.SEEK_END) + len(text) >= self.maxBytes:
                self.doRollover()
            self.stream.write(text)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # a log on a full disk: the record is dropped and counted, not a traceback on stderr for each
        if isinstance(sys.exc_info()[1], OSError):
            self.lost += 1
            return
        super().handleError(record)

    def doRollover(self) -> None:
        super().doRollover()
        if self.follow_stderr and self.stream is not None:
            sys.stderr.flush()
            os.dup2(self.stream.fileno(), 2)


def _same_file(fd: int, other: int) -> bool:
    try:
        a, b = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def setup_logging(name: str, verbose: bool, log_file: str | None = None) -> None:
    """Records to stderr, or to ``log_file`` rotated by size (OSError when it cannot be opened)."""
    handler = RotatingLog(log_file) if log_file else logging.StreamHandler(sys.stderr)
    # on the handler, not a logger: a handler's filters see every logger's records
    handler.addFilter(PlainRecords())
    # the format names no source line, thread or process: a record need not look them
    # up (a third of a line's cost, and the dispatcher writes one or two per build).
    # It also turns off stack_info=True, which nothing here asks for
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler.setFormatter(_Stamped(f"%(asctime)s {name} %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


READY = re.compile(r"tinyci (\w+) listening on (\S+):(\d+)")


def announce(name: str, host: str, port: int, extra: str = "") -> None:
    """The one ready line `tinyci up`, the tests and the benchmarks wait for
    (``parse_ready`` reads it back)."""
    print(f"tinyci {name} listening on {host}:{port}{extra}", flush=True)


def parse_ready(line: str) -> tuple[str, str, int] | None:
    """(daemon, host, port) from a daemon's ready line, or None for any other line."""
    match = READY.search(line)
    return (match.group(1), match.group(2), int(match.group(3))) if match else None


async def listen(start: Callable[[], Awaitable[Any]], what: str, host: str, port: int) -> Any:
    """Start a server, turning the usual bind failures into a StartupError naming the address."""
    try:
        return await start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            # no "{what}: " prefix: `run` prints "tinyci <daemon>: " before it already
            raise StartupError(f"port {port} on {host} is already in use "
                               f"(pick another with --port, or 0 for any free port)") from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc}") from None


def run(name: str, body: Callable[[asyncio.Event], Awaitable[None]], verbose: bool = False,
        log_file: str | None = None) -> int:
    """Run ``body(stop)`` until it returns; SIGINT/SIGTERM only set ``stop``.
    ``log_file``: log there (rotated) instead of stderr."""
    try:
        setup_logging(name, verbose, log_file)
    except OSError as exc:
        print(f"tinyci {name}: cannot write its log file {log_file}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await body(stop)

    try:
        asyncio.run(main())
    except StartupError as exc:
        print(f"tinyci {name}: {plain(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        pass
    logging.getLogger(f"ci.{name}").info("stopped")
    return 0
