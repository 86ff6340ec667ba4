"""The wire protocol, apart from the transport: roles, field kinds, the one
table of every message and its reply, validation, error codes, and the JSON
encoding of one frame.


A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON: one
object with a string ``type``. On connect the server speaks first::

    server: {"type": "hello", "version": 1, "nonce": N}
    client: {"type": "auth", "role": R, "mac": HMAC-SHA256(secret of R, N + ":" + R)}
    server: {"type": "ok", "role": R}            (or an error, then close)

Each role has its own secret (config ``auth.<role>_secret``, falling back to
``auth.secret``); a wrong role, or a wrong or missing MAC, gets the one answer
``auth_failed`` "authentication failed" and the connection closes. With
``tls`` configured, all of this runs inside TLS (``serve``/``Client`` ``ssl=``).

then requests follow, each with exactly one reply (``ok``, ``error``,
``pong``), except the two streams, which send ``chunk``/``event`` frames and
say where they end with ``end``.

    from -> to                 type       fields                                   answer
    observer -> dispatcher     commit     repo branch sha author subject time     ok {build, builds, duplicate}
                                          [message jobs config_error]
    runner -> dispatcher       register   name host port labels slots running     ok {heartbeat_interval}
    runner -> dispatcher       log        build attempt offset data               ok {offset} | error offset/stale
    runner -> dispatcher       result     build attempt status exit_code steps    ok | error stale
                                          duration log_size
    dispatcher -> runner       run        build attempt repo sha branch steps     ok | error busy
                                          timeout env [job artifacts_limit]
    runner -> dispatcher       artifact   build attempt path offset data eof      ok {offset} | error
    dispatcher -> runner       ping       -                                       pong {running}
    dispatcher, operator -> *  cancel     build attempt? by?                      ok
    reader -> dispatcher       status     limit                                   ok {runners, builds}
    reader -> dispatcher       build      build                                   ok {build}
    reader -> dispatcher       read_log   build offset follow                     chunk... end {status}
    reader -> dispatcher       watch      limit                                   ok {runners, builds, queue},
                                                                                then event... (until closed)
    reader -> dispatcher       artifacts  build                                   ok {artifacts}
    reader -> dispatcher       fetch_artifact build path offset                   ok {data offset size eof}
    operator -> dispatcher     trigger    branch | rev                            ok {builds}
    operator -> dispatcher     rebuild    build                                   ok {builds}
    observer, operator -> obs. poke       branch                                  ok

``commit.jobs`` is the commit's ``.ci.yaml`` jobs as the observer read them
([{name, labels}]; absent: one default job), ``config_error`` the reason that
file is unusable. ``run.job`` names the job whose steps the runner takes from
the ``.ci.yaml`` of its checkout. Artifact ``data`` is base64, in chunks.

``operator`` may send everything ``reader`` may. DESIGN.md names the
tools' log request ``log``; it is ``read_log`` here because the runner's
``log`` frame already has that name with other fields.

Every message is declared once, in ``MESSAGES`` below, with who may send it.
Only this module turns bytes into messages; ``net`` moves them.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from . import patterns

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")

# Roles a client authenticates as. Runners accept work only from "dispatcher".
DISPATCHER, RUNNER, OBSERVER, OPERATOR, READER = (
    "dispatcher", "runner", "observer", "operator", "reader")
ROLES = (DISPATCHER, RUNNER, OBSERVER, OPERATOR, READER)
SERVER = "server"          # pseudo-sender of replies and stream frames
TOOLS = frozenset({READER, OPERATOR})



# ---------------------------------------------------------------- errors

class ProtocolError(Exception):
    """A peer sent something the protocol does not allow; ``code`` goes on the wire."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class FatalProtocolError(ProtocolError):
    """The byte stream cannot be trusted any more: the connection must close."""



class RemoteError(Exception):
    """The peer answered a request with an ``error`` frame."""

    def __init__(self, reply: dict):
        self.code = reply.get("code", "error")
        self.message = reply.get("message", "")
        self.reply = reply
        super().__init__(f"{self.code}: {self.message}")



# ---------------------------------------------------------------- field kinds

@dataclass(frozen=True)
class Kind:
    """One field type: ``check`` returns the value or raises ProtocolError."""

    name: str
    check: Callable[[Any], bool]

    def validate(self, value: Any, where: str) -> Any:
        if not self.check(value):
            raise ProtocolError("bad_field", f"{where}: expected {self.name}, got {_short(value)}")
        return value


def _short(value: Any) -> str:
    try:
        text = json.dumps(value)[:40]
    except (TypeError, ValueError, RecursionError):     # a peer may nest as deep as the parser allows
        text = "..."
    return f"{type(value).__name__} {text}"


def _int(lo: int, hi: int) -> Kind:
    return Kind(f"integer {lo}..{hi}",
                lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi)


def _str(max_len: int) -> Kind:
    return Kind(f"string of at most {max_len} characters",
                lambda v: isinstance(v, str) and len(v) <= max_len)


def _list(item: Kind, max_len: int) -> Kind:
    return Kind(f"list of at most {max_len} {item.name}",
                lambda v: isinstance(v, list) and len(v) <= max_len and all(item.check(i) for i in v))


BUILD_ID = _int(1, 2**62)
ATTEMPT = _int(0, 10_000)
COUNT = _int(0, 2**62)
PORT = _int(0, 65535)
NAME = Kind(patterns.NAME_RULE, patterns.is_name)
SHA = Kind("40 lowercase hex digits", patterns.is_sha)
BRANCH = Kind("git branch name", patterns.is_branch)
TEXT = _str(4096)
PATH = _str(4096)
# what runners clone: a path or URL, never something git could take for an option
REPO = Kind("repository path or URL (1-4096 characters, no control characters, not starting with '-')",
            lambda v: isinstance(v, str) and 0 < len(v) <= 4096 and not v.startswith("-")
            and re.search(r"[\x00-\x1f\x7f]", v) is None)
DATA = _str(1 << 20)
NUMBER = Kind("finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and -1e15 < v < 1e15)    # also refuses NaN and infinity, which JSON parsing lets in
BOOL = Kind("boolean", lambda v: isinstance(v, bool))
STEPS = _list(_str(16384), 200)
LABELS = _list(NAME, 50)
ENV = Kind("mapping of names to strings", lambda v: isinstance(v, dict) and len(v) <= 200 and all(
    patterns.is_env_name(k) and isinstance(x, str)
    and len(x) <= 16384 for k, x in v.items()))
LEASES = Kind("list of [build, attempt] pairs", lambda v: isinstance(v, list) and len(v) <= 1000 and all(
    isinstance(p, list) and len(p) == 2 and BUILD_ID.check(p[0]) and ATTEMPT.check(p[1]) for p in v))
STATUS = Kind("status", lambda v: v in ("queued", "running", "passed", "failed", "error", "cancelled",
                                         "skipped"))
FINAL = Kind("final status", lambda v: v in ("passed", "failed", "error", "cancelled"))
JOB = Kind("job name ('' or 1-100 letters, digits or ._:@-)", lambda v: v == "" or NAME.check(v))
JOBS = Kind("list of at most 100 {name, labels}", lambda v: isinstance(v, list) and 0 < len(v) <= 100 and all(
    isinstance(j, dict) and set(j) == {"name", "labels"} and JOB.check(j["name"]) and LABELS.check(j["labels"])
    for j in v))
ROLE = Kind("role (" + ", ".join(ROLES) + ")", lambda v: v in ROLES)


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Spec:
    senders: frozenset
    required: Mapping[str, Kind] = field(default_factory=dict)
    optional: Mapping[str, Kind] = field(default_factory=dict)
    open: bool = False          # replies may carry any further fields


def _spec(senders, required=None, optional=None, open=False) -> Spec:
    if isinstance(senders, str):
        senders = {senders}
    return Spec(frozenset(senders), required or {}, optional or {}, open)


MESSAGES: dict[str, Spec] = {
    # handshake
    "hello": _spec(SERVER, {"version": _int(1, 1000), "nonce": _str(128)}),
    "auth": _spec(ROLES, {"role": ROLE, "mac": _str(128)}),
    # observer -> dispatcher
    "commit": _spec(OBSERVER, {"repo": REPO, "branch": BRANCH, "sha": SHA, "author": TEXT,
                               "subject": TEXT, "time": NUMBER},
                      {"message": TEXT, "jobs": JOBS, "config_error": TEXT}),
    # runner -> dispatcher
    "register": _spec(RUNNER, {"name": NAME, "host": _str(255), "port": PORT, "labels": LABELS,
                               "slots": _int(1, 256)}, {"running": LEASES}),
    "log": _spec(RUNNER, {"build": BUILD_ID, "attempt": ATTEMPT, "offset": COUNT, "data": DATA}),
    "result": _spec(RUNNER, {"build": BUILD_ID, "attempt": ATTEMPT, "status": FINAL,
                             "exit_code": _int(-1000, 1000), "steps": _int(0, 10_000),
                             "duration": NUMBER}, {"log_size": COUNT}),
    "artifact": _spec(RUNNER, {"build": BUILD_ID, "attempt": ATTEMPT, "path": PATH, "offset": COUNT,
                               "data": DATA, "eof": BOOL}),
    # dispatcher -> runner
    "run": _spec(DISPATCHER, {"build": BUILD_ID, "attempt": ATTEMPT, "repo": REPO, "sha": SHA,
                              "branch": BRANCH, "steps": STEPS, "timeout": NUMBER, "env": ENV},
                {"job": JOB, "artifacts_limit": COUNT}),
    "ping": _spec(DISPATCHER),
    # by: who asked (user@host), for the build's log
    "cancel": _spec({DISPATCHER, OPERATOR}, {"build": BUILD_ID}, {"attempt": ATTEMPT, "by": _str(200)}),
    # tools -> dispatcher
    "status": _spec(TOOLS, {}, {"limit": _int(1, 10_000)}),
    "build": _spec(TOOLS, {"build": BUILD_ID}),
    "read_log": _spec(TOOLS, {"build": BUILD_ID}, {"offset": COUNT, "follow": BOOL}),
    "watch": _spec(TOOLS, {}, {"limit": _int(1, 10_000)}),
    "artifacts": _spec(TOOLS, {"build": BUILD_ID}),
    "fetch_artifact": _spec(TOOLS, {"build": BUILD_ID, "path": PATH}, {"offset": COUNT}),
    "trigger": _spec(OPERATOR, {}, {"branch": BRANCH, "rev": _str(255), "repo": REPO}),
    "rebuild": _spec(OPERATOR, {"build": BUILD_ID}),
    # git hook -> observer
    "poke": _spec({OBSERVER, OPERATOR}, {}, {"branch": BRANCH}),
    # replies and stream frames
    "ok": _spec(SERVER, open=True),
    "error": _spec(SERVER, {"code": _str(64), "message": TEXT}, open=True),
    "pong": _spec(SERVER, {"running": LEASES}),
    "chunk": _spec(SERVER, {"offset": COUNT, "data": DATA}),
    "event": _spec(SERVER, {"event": _str(64)}, open=True),
    "end": _spec(SERVER, {}, open=True),
}


def validate(msg: Any, sender: str) -> dict:
    """Check one decoded message against the table; returns it or raises ProtocolError."""
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", f"a message must be a JSON object, got {type(msg).__name__}")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "a message needs a string field 'type'")
    spec = MESSAGES.get(kind)
    if spec is None:
        raise ProtocolError("unknown_type", f"unknown message type {kind[:40]!r}")
    if sender not in spec.senders:
        raise ProtocolError("forbidden", f"role {sender!r} may not send {kind!r}")
    for name, fkind in spec.required.items():
        if name not in msg:
            raise ProtocolError("missing_field", f"{kind}: missing field {name!r}")
        fkind.validate(msg[name], f"{kind}.{name}")
    for name, fkind in spec.optional.items():
        if name in msg:
            fkind.validate(msg[name], f"{kind}.{name}")
    if not spec.open:
        extra = set(msg) - {"type"} - set(spec.required) - set(spec.optional)
        if extra:
            raise ProtocolError("unknown_field", f"{kind}: unknown field {sorted(extra)[0][:40]!r}")
    return msg


def error(code: str, message: str, **extra: Any) -> dict:
    return {"type": "error", "code": code, "message": message, **extra}


def ok(**fields: Any) -> dict:
    return {"type": "ok", **fields}



# ---------------------------------------------------------------- framing

def encode(msg: dict) -> bytes:
    body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("bad_frame", "frame is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ProtocolError("bad_frame", "frame is not valid JSON") from None


