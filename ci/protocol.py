"""The wire protocol, apart from the transport: roles, field kinds, the one
table of every message and its reply, validation, error codes, and the JSON
encoding of one frame.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON: one
object with a string ``type``. A *bulk* frame carries bytes as they are: its
JSON header has ``bytes: N`` (no ``data``), and N raw bytes follow the
frame; they are the message's ``data`` (``bytes`` in Python). N is bounded by
``net.max_bulk`` (none at all before the handshake is done); a count that is
not a whole number, or over the bound, closes the connection, since the
stream cannot be followed after it. Only the fields the table declares as
bytes (``BYTES``, ``TEXT_OR_BYTES``) take bulk data: logs, artifacts and log
chunks, so no byte is base64'd or JSON-escaped on the way. On connect the server speaks first (the
handshake, done by ``net``; K is the key for the client's role and id)::

    server: hello {version: 2, nonce: Ns, name: S}
    client: auth  {role: R, id: I, nonce: Nc, to: T,
                   mac: HMAC-SHA256(K, "tinyci/3 client" NUL Ns NUL Nc NUL R NUL I NUL T)}
    server: ok    {role: R, mac: HMAC-SHA256(K, "tinyci/3 server" NUL Ns NUL Nc NUL R NUL I NUL T)}
                  (or error auth_failed, then close)

S and T are identities: ``dispatcher``, ``observer`` or ``runner:<name>``;
T is whom the client meant to reach, and a server refuses any T but its own
S. I is the runner's name for role ``runner``, else empty. Keys: a runner's
own credential (``auth.runners``, else the shared runner secret) for role
``runner`` with that id, and for role ``dispatcher`` dialling that runner;
``auth.<role>_secret`` (else ``auth.secret``) for the other roles. A wrong
role, id, target or MAC gets the one answer ``auth_failed`` "authentication
failed" and the connection closes. With ``tls`` configured, all of this runs
inside TLS (``serve``/``Client`` ``ssl=``).

Then requests follow. Each gets exactly one reply, or, for the two streams,
frames that say where they end. Any request may be answered by an ``error``
{code, message, expected?} instead (the codes are in ``ERRORS``); an error
also ends a stream::

    from -> to                 type       fields ([optional])                     reply
    observer -> dispatcher     commit     repo branch sha author subject time     ok {build builds duplicate}
                                          [message jobs config_error]
    runner -> dispatcher       register   name host port labels slots [running]   ok {heartbeat_interval}
                                                                                  | error name_taken / not_yours
    runner -> dispatcher       log        build attempt offset data (bytes)       ok {offset}
                                                                                  | error offset {expected} / stale
                                                                                  / not_yours / disk_full
    runner -> dispatcher       result     build attempt status exit_code steps    ok
                                          duration [log_size step_results tests]  | error offset {expected} / stale
                                                                                  / not_yours / disk_full
    runner -> dispatcher       artifact   build attempt path offset data (bytes)  ok {offset} | error not_yours
                                          eof
                                                                                  / disk_full
    dispatcher -> runner       run        build attempt repo sha branch steps     ok | error busy
                                          timeout env [job artifacts_limit inputs
                                          definition override secrets]
    dispatcher -> runner       ping       -                                       pong {running}
    dispatcher, operator -> *  cancel     build [attempt by]                      ok {[builds]}
    reader -> dispatcher       status     [limit]                                 ok {runners builds pipelines queue
                                                                                  [conditions]}
    reader -> dispatcher       build      build                                   ok {build}
    reader -> dispatcher       read_log   build [offset follow timestamps binary] stream: chunk {offset data [times]}...
                                                                                  then end {status offset}
    reader -> dispatcher       watch      [limit]                                 stream: ok {runners builds
                                                                                  pipelines queue} once, then
                                                                                  event {event [build runner
                                                                                  conditions]}...
                                                                                  until end {reason}
    reader -> dispatcher       history    [repo branch status author job sha      ok {builds older newer}
                                          before after limit]
    reader -> dispatcher       branch_status branch [repo]                        ok {status [sha builds]}
    reader -> dispatcher       log_window build [offset line limit]               ok {data offset line size status}
    reader -> dispatcher       counts     since                                   ok {counts}
    reader -> dispatcher       artifacts  build                                   ok {artifacts}
    reader, runner -> disp.    fetch_artifact                                     ok {data (bytes) offset size eof}
                                          build path [offset]
    reader, runner -> disp.    read_artifact                                      stream: ok {size} once, then
                                          build path [offset]                     chunk {offset data (bytes)}...
                                                                                  then end {offset}
    operator -> dispatcher     trigger    [branch rev repo job]                   ok {builds}
    operator -> dispatcher     rebuild    build                                   ok {builds}
    operator -> dispatcher     drain      name                                    ok {runner} | error not_found
    operator -> dispatcher     resume     name                                    ok {runner} | error not_found
    operator -> dispatcher     forget     name                                    ok | error not_found
                                                                                  / runner_alive
    operator -> dispatcher     gc         [dry_run]                               ok {builds log_bytes artifact_bytes
                                                                                  days per_branch dry_run [db_bytes]}
    observer, operator -> obs. poke       [branch]                                ok

A runner's frames are its own: ``register`` names the runner the connection
authenticated as, and ``log``, ``result`` and ``artifact`` are for builds
that runner holds.

``commit.jobs`` is the commit's ``.ci.yaml`` jobs as the observer read them
([{name, labels, [needs, skip, secrets]}], a matrix job once per combination,
named ``test (python=3.11)``; absent: the commit has no ``.ci.yaml``, one
default job or the server's ``pipelines`` entry): ``needs``, the jobs of the
same commit that must pass first; ``skip``, why its ``when`` keeps it from
running (recorded ``skipped``). ``config_error`` is the reason that file is
unusable. ``run.job`` names the job whose steps the runner takes from the
``.ci.yaml`` of its checkout; ``run.inputs`` are the artifacts of the builds
it needs ([{build, job, path}]), which the runner fetches (``read_artifact``,
only for a build of the same commit as one it holds) into its checkout.
``read_artifact`` is ``fetch_artifact`` as a stream: the artifact's ``size``
first, then its bytes from ``offset`` in chunks of up to ``net.max_bulk``
(sent from the file without passing through the dispatcher's memory), then
``end`` at the size (a chunk may wait for the reader up to ``net.idle_timeout``).
``artifact``'s ``ok {offset}`` says how much of the file is written: a chunk
between the first and the last is answered once the chunks before it are
written (its own ``offset``) and written while the next one comes; the last
is answered once the whole file is written and synced (its size).
``fetch_artifact``, a request per chunk, is kept for the web page (a
browser may take its time with each) and older tools.
``commit.jobs[].secrets`` names the build secrets a job asks for. The runner takes a job's
steps from ``run.definition`` (the dispatcher's ``pipelines.<repo>``, as
.ci.yaml text) instead when the checkout has no ``.ci.yaml`` or
``run.override`` is true. ``run.secrets`` are the build secrets the job asked
for and its branch may have, name -> value: only ever in a ``run`` (in clear
without TLS, as ``env``). Artifact ``data`` is bytes (bulk frames), in chunks;
a ``log``'s is bytes too (text is still accepted). ``read_log.binary`` asks
for chunks whose ``data`` is bytes (bulk frames) rather than text.
``read_log.timestamps`` adds to each chunk its ``times``: [offset, unix time]
pairs saying when the bytes from each offset reached the dispatcher.
``trigger.repo`` says which repository ``branch`` or ``rev`` is in, ``trigger.job`` queues
only that job of the commit's ``.ci.yaml`` (not_found when it has no such job).
``result.tests`` is what the build's JUnit reports counted (``TESTS``:
passed, failed, errors, skipped and at most 100 failed tests' names); the
dispatcher keeps it with the build: ``build`` returns it whole, and the
builds of ``status``, ``watch`` events and ``history`` carry its counts.

``history`` pages through every build, newest first (keyset paging: the
builds below ``before``, or just above ``after``), filtered by exact repo,
branch, status and job, part of the author, and a prefix of the sha;
``older``/``newer`` say whether more pages exist. ``branch_status`` is the
status of a branch's newest finished pipeline (a commit's jobs, by the
pipeline rule): passed, failed or error; ``running`` when none has finished
but one is under way; ``unknown`` with no builds. ``log_window`` reads at most
``limit`` bytes of a log: from ``offset``, from the start of ``line``
(1-based), or, with neither, its tail, starting at a line; ``line`` in the
reply numbers its first line, ``size`` is the whole log's. ``counts`` are the
builds finished since a time, by status.

``conditions`` are what the dispatcher is in that is not a bug and lasts
(its disk full: ``disk_full``): [{name, message, since}], shown as
``dispatcher: <message>``; an ``event`` ``conditions`` carries the new list
whenever it changes. A runner whose ``log`` is refused with ``disk_full``
stops sending that log and sends its result; the dispatcher records the
result with a note where the log stops. ``gc`` runs a retention sweep now
(``dry_run``: only says what it would delete) and answers with what it
deleted (builds, and the bytes of their logs and artifacts; ``db_bytes``,
what the database gave back to the disk) and the policy it applied.

``operator`` may send everything ``reader`` may. DESIGN.md names the
tools' log request ``log``; it is ``read_log`` here because the runner's
``log`` frame already has that name with other fields.

Every message is declared once, in ``MESSAGES`` below: who may send it, its
fields, and for a request the reply it gets (``Spec.reply``) or the frames of
its stream (``Spec.stream``). The server (``net``) sends only replies the
table allows, and clients check every reply against it (``Answers``), so a
caller may rely on a reply's declared fields. Only this module turns bytes
into messages; ``net`` moves them.

To add a message: one entry in ``MESSAGES`` (and its reply), a handler in
the daemon that receives it, and a case in tests/test_protocol.py.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping

from . import patterns

# 3: logs and artifacts as raw bytes in bulk frames, and read_artifact (a peer of an older
# tinyci is told at the handshake to run the same version, not refused field by field later)
PROTOCOL_VERSION = 3
HEADER = struct.Struct(">I")
# one encoder for every frame: json.dumps with options makes a new one per call (a fifth of an encode)
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# A frame's JSON header with this field is a bulk frame: that many raw bytes
# follow it, and they become the message's ``data``. No message has a field
# of this name.
BULK = "bytes"

# Roles a client authenticates as. Runners accept work only from "dispatcher".
DISPATCHER, RUNNER, OBSERVER, OPERATOR, READER = (
    "dispatcher", "runner", "observer", "operator", "reader")
ROLES = (DISPATCHER, RUNNER, OBSERVER, OPERATOR, READER)
SERVER = "server"          # pseudo-sender of replies and stream frames
TOOLS = frozenset({READER, OPERATOR})
# What a server is in the handshake (hello.name) and whom a client means to reach (auth.to)
DISPATCHER_ID, OBSERVER_ID, RUNNER_PREFIX = "dispatcher", "observer", "runner:"


def runner_identity(name: str) -> str:
    return RUNNER_PREFIX + name



# ---------------------------------------------------------------- errors

# Every ``code`` an error reply carries, and what it means. Clients branch on
# a few of them (stale, offset, busy, not_found, auth_failed, internal).
ERRORS: Mapping[str, str] = {
    # any request (net, protocol)
    "bad_frame": "the frame is not UTF-8 JSON",
    "bad_message": "not a JSON object with a string type, or hello/auth after the handshake",
    "unknown_type": "no message of that type in the table",
    "forbidden": "the sender's role may not send that type; fetch_artifact: a runner asking for a build of a "
                 "commit it holds no build of",
    "missing_field": "a required field is absent (the message names it)",
    "bad_field": "a field's value is not of its kind (the message names the field and the kind)",
    "unknown_field": "a field the table does not declare for that type",
    "unsupported": "a valid message this daemon does not handle (e.g. status sent to the observer)",
    "internal": "the daemon failed to answer: a bug or a disk error, logged there; try again later",
    "too_large": "the reply would not fit in a frame; or an artifact over the build's limit",
    "frame_too_large": "a length prefix over the frame limit; the connection closes after it",
    "busy": "the daemon has too many connections; or the runner's slots are full, or it starts or stops",
    # the handshake
    "auth_required": "the first frame after hello was not auth; the connection closes",
    "auth_failed": "a wrong role, id or target, or a wrong or missing MAC (one answer for all); "
                   "the connection closes",
    # particular requests
    "stale": "log/result/artifact: that build attempt is no longer this runner's",
    "not_yours": "log/result/artifact: the build is held by another runner than the one this connection "
                 "authenticated as; register: a name other than the authenticated one",
    "name_taken": "register: a live runner at another address holds that name (the message names it)",
    "offset": "log/result: the offset does not follow what the dispatcher has (expected: what it has); "
              "artifact: a chunk out of order",
    "not_found": "no such build, artifact, repository, revision or runner",
    "runner_alive": "forget: the runner is alive; only a dead runner can be forgotten",
    "disk_full": "log, artifact: the dispatcher's disk is down to its reserve (dispatcher.min_free_bytes): "
                 "stop sending that log and send the result, leave the artifact out; any other request "
                 "that writes: the disk is full, try again later",
    "ambiguous": "trigger: the revision is a commit in more than one repository; say which (repo)",
    "finished": "cancel: the build has already ended",
    "forbidden_repo": "commit: the repository is not in the dispatcher's dispatcher.repos",
    "bad_request": "trigger: neither a branch nor a revision",
    "bad_path": "artifact, fetch_artifact: not a safe relative path inside the build's artifacts",
    "bad_sha": "artifact: the build has no valid sha to file its artifacts under",
    # raised by a client, never sent
    "bad_reply": "a reply the table does not allow for the request (its type, or a frame after the end)",
}


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


def _number(v: Any) -> bool:
    # also refuses NaN and infinity, which JSON parsing lets in
    return isinstance(v, (int, float)) and not isinstance(v, bool) and -1e15 < v < 1e15


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
# bytes come only from a bulk frame (JSON has none); their bound is the framing's (net.max_bulk)
BYTES = Kind("bytes (sent raw in a bulk frame)", lambda v: isinstance(v, bytes))
# a frame of a LENT type: its bytes as a view of a buffer its connection reuses (Connection.give_back)
LENT_BYTES = Kind(BYTES.name, lambda v: isinstance(v, memoryview) or BYTES.check(v))
TEXT_OR_BYTES = Kind("string of at most 1048576 characters, or bytes (a bulk frame)",
                     lambda v: DATA.check(v) or BYTES.check(v))
NUMBER = Kind("finite number", _number)
POSITIVE = Kind("finite number above 0", lambda v: _number(v) and v > 0)
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
JOB = Kind("job name ('' or a .ci.yaml job name, with a matrix combination: 'test (python=3.11)')",
           lambda v: v == "" or patterns.is_job(v))
# one job of a commit: its name and labels; the builds it needs (same commit), why `when` skips it
JOB_KEYS, JOB_OPTIONAL = {"name", "labels"}, {"needs", "skip", "secrets"}
SECRET_NAMES = Kind("list of at most 50 environment variable names", lambda v: isinstance(v, list)
                    and len(v) <= 50 and all(patterns.is_env_name(n) for n in v))
NEEDS = Kind("list of at most 100 job names", lambda v: isinstance(v, list) and len(v) <= 100
             and all(isinstance(n, str) and n and JOB.check(n) for n in v))
JOBS = Kind("list of at most 100 {name, labels, [needs, skip, secrets]}", lambda v: isinstance(v, list) and 0 < len(v) <= 100
            and all(isinstance(j, dict) and JOB_KEYS <= set(j) <= JOB_KEYS | JOB_OPTIONAL and JOB.check(j["name"])
                    and LABELS.check(j["labels"]) and NEEDS.check(j.get("needs", []))
                    and TEXT.check(j.get("skip", "")) and SECRET_NAMES.check(j.get("secrets", [])) for j in v))
# a run's inputs: the artifacts of the builds it needs, fetched into its checkout before the steps
INPUTS = Kind("list of at most 1000 {build, job, path}", lambda v: isinstance(v, list) and len(v) <= 1000 and all(
    isinstance(i, dict) and set(i) == {"build", "job", "path"} and BUILD_ID.check(i["build"])
    and JOB.check(i["job"]) and PATH.check(i["path"]) for i in v))
# a build definition kept on the dispatcher, as .ci.yaml text (buildfile.MAX_SIZE)
DEFINITION = _str(256 * 1024)
ROLE = Kind("role (" + ", ".join(ROLES) + ")", lambda v: v in ROLES)
# the handshake's parts are joined with NUL for the MAC: none of these can hold one
NONCE = Kind("16-64 hex digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16,64}", v) is not None)
CLIENT_ID = Kind("'' or a runner " + patterns.NAME_RULE, lambda v: v == "" or patterns.is_name(v))
IDENTITY = Kind("identity (dispatcher, observer or runner:<name>)",
                lambda v: v in (DISPATCHER_ID, OBSERVER_ID)
                or (isinstance(v, str) and v.startswith(RUNNER_PREFIX) and patterns.is_name(v[len(RUNNER_PREFIX):])))
MAC = Kind("'' or 64 hex digits", lambda v: isinstance(v, str) and re.fullmatch(r"([0-9a-f]{64})?", v) is not None)
# in replies, which only our own daemons send: bounded by the frame, not by a count
BUILD_IDS = Kind("list of build ids", lambda v: isinstance(v, list) and all(BUILD_ID.check(i) for i in v))
OBJECT = Kind("object", lambda v: isinstance(v, dict))
OBJECTS = Kind("list of objects", lambda v: isinstance(v, list) and all(isinstance(i, dict) for i in v))
CODE = _str(64)
MESSAGE = _str(1 << 16)         # an error's text may quote a repository path and a revision
# "build" or "runner", with that field; a viewer skips kinds it does not know (a newer dispatcher's)
SHA_PREFIX = Kind("1-40 lowercase hex digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{1,40}", v)
                  is not None)
# a result's steps, as the runner ran them: the web page shows each with its exit and duration
STEP_RESULTS = Kind("list of at most 200 {name, run, exit_code, duration}", lambda v: isinstance(v, list)
                    and len(v) <= 200 and all(
                        isinstance(s, dict) and set(s) == {"name", "run", "exit_code", "duration"}
                        and _str(200).check(s["name"]) and _str(16384).check(s["run"])
                        and (s["exit_code"] is None or _int(-1000, 1000).check(s["exit_code"]))
                        and _number(s["duration"]) for s in v))
# a result's test reports (ci/reports.py): the counts and at most 100 failed tests' names
TESTS = Kind("{passed, failed, errors, skipped: counts; failures: at most 100 names of at most 300 characters}",
             lambda v: isinstance(v, dict) and set(v) == {"passed", "failed", "errors", "skipped", "failures"}
             and all(_int(0, 10**9).check(v[k]) for k in ("passed", "failed", "errors", "skipped"))
             and isinstance(v["failures"], list) and len(v["failures"]) <= 100
             and all(_str(300).check(name) for name in v["failures"]))
# when each part of a log reached the dispatcher: [offset, unix time] pairs, offsets ascending
TIMES = Kind("list of [offset, time] pairs", lambda v: isinstance(v, list) and all(
    isinstance(p, list) and len(p) == 2 and COUNT.check(p[0]) and _number(p[1]) for p in v))
BADGE = Kind("branch status", lambda v: v in ("passed", "failed", "error", "running", "unknown"))
LOG_WINDOW_MAX = 128 * 1024     # bytes: a window of control characters, JSON-escaped six-fold, still fits a frame
EVENT = Kind("event kind (1-64 characters)", lambda v: isinstance(v, str) and 0 < len(v) <= 64)


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Shape:
    """One frame of an answer: its type and the fields it carries."""

    type: str
    required: Mapping[str, Kind] = field(default_factory=dict)
    optional: Mapping[str, Kind] = field(default_factory=dict)


@dataclass(frozen=True)
class Stream:
    """A request answered by many frames: ``first`` once (when given), then
    any number of ``each``, then ``end``. An ``error`` may end it at any point."""

    each: Shape
    end: Shape
    first: Shape | None = None


@dataclass(frozen=True)
class Spec:
    senders: frozenset
    required: Mapping[str, Kind] = field(default_factory=dict)
    optional: Mapping[str, Kind] = field(default_factory=dict)
    open: bool = False          # the fields depend on the request answered (checked by its Shape)
    reply: Shape | None = None  # a request: its one reply (or an error)
    stream: Stream | None = None    # a stream request: the frames that answer it

    @property
    def is_request(self) -> bool:
        return self.reply is not None or self.stream is not None


def _spec(senders, required=None, optional=None, open=False, reply=None, stream=None) -> Spec:
    if isinstance(senders, str):
        senders = {senders}
    return Spec(frozenset(senders), required or {}, optional or {}, open, reply, stream)


def _ok(required=None, optional=None) -> Shape:
    return Shape("ok", required or {}, optional or {})


ERROR = Shape("error", {"code": CODE, "message": MESSAGE}, {"expected": COUNT})
SNAPSHOT = _ok({"runners": OBJECTS, "builds": OBJECTS, "pipelines": OBJECTS, "queue": BUILD_IDS},
              {"conditions": OBJECTS})
QUEUED = _ok({"builds": BUILD_IDS})

MESSAGES: dict[str, Spec] = {
    # handshake
    "hello": _spec(SERVER, {"version": _int(1, 1000), "nonce": NONCE, "name": IDENTITY}),
    "auth": _spec(ROLES, {"role": ROLE, "id": CLIENT_ID, "nonce": NONCE, "to": IDENTITY, "mac": MAC},
                  reply=_ok({"role": ROLE, "mac": MAC})),
    # observer -> dispatcher
    "commit": _spec(OBSERVER, {"repo": REPO, "branch": BRANCH, "sha": SHA, "author": TEXT,
                               "subject": TEXT, "time": NUMBER},
                    {"message": TEXT, "jobs": JOBS, "config_error": TEXT},
                    reply=_ok({"build": BUILD_ID, "builds": BUILD_IDS, "duplicate": BOOL})),
    # runner -> dispatcher
    "register": _spec(RUNNER, {"name": NAME, "host": _str(255), "port": PORT, "labels": LABELS,
                               "slots": _int(1, 256)}, {"running": LEASES},
                      reply=_ok({"heartbeat_interval": POSITIVE})),
    "log": _spec(RUNNER, {"build": BUILD_ID, "attempt": ATTEMPT, "offset": COUNT, "data": TEXT_OR_BYTES},
                 reply=_ok({"offset": COUNT})),
    "result": _spec(RUNNER, {"build": BUILD_ID, "attempt": ATTEMPT, "status": FINAL,
                             "exit_code": _int(-1000, 1000), "steps": _int(0, 10_000),
                             "duration": NUMBER}, {"log_size": COUNT, "step_results": STEP_RESULTS, "tests": TESTS},
                    reply=_ok()),
    "artifact": _spec(RUNNER, {"build": BUILD_ID, "attempt": ATTEMPT, "path": PATH, "offset": COUNT,
                               "data": LENT_BYTES, "eof": BOOL},
                      reply=_ok({"offset": COUNT})),
    # dispatcher -> runner
    "run": _spec(DISPATCHER, {"build": BUILD_ID, "attempt": ATTEMPT, "repo": REPO, "sha": SHA,
                              "branch": BRANCH, "steps": STEPS, "timeout": NUMBER, "env": ENV},
                 {"job": JOB, "artifacts_limit": COUNT, "inputs": INPUTS, "definition": DEFINITION,
                  "override": BOOL, "secrets": ENV},
                 reply=_ok()),
    "ping": _spec(DISPATCHER, reply=Shape("pong", {"running": LEASES})),
    # by: who asked (user@host), for the build's log; the dispatcher says which builds it cancelled
    "cancel": _spec({DISPATCHER, OPERATOR}, {"build": BUILD_ID}, {"attempt": ATTEMPT, "by": _str(200)},
                    reply=_ok(optional={"builds": BUILD_IDS})),
    # tools -> dispatcher
    "status": _spec(TOOLS, {}, {"limit": _int(1, 10_000)}, reply=SNAPSHOT),
    "build": _spec(TOOLS, {"build": BUILD_ID}, reply=_ok({"build": OBJECT})),
    "read_log": _spec(TOOLS, {"build": BUILD_ID}, {"offset": COUNT, "follow": BOOL, "timestamps": BOOL,
                                                   "binary": BOOL},
                      stream=Stream(each=Shape("chunk", {"offset": COUNT, "data": TEXT_OR_BYTES},
                                               {"times": TIMES}),
                                    end=Shape("end", {"status": STATUS, "offset": COUNT}))),
    "watch": _spec(TOOLS, {}, {"limit": _int(1, 10_000)},
                   stream=Stream(first=SNAPSHOT,
                                 each=Shape("event", {"event": EVENT}, {"build": OBJECT, "runner": OBJECT,
                                                                        "conditions": OBJECTS}),
                                 end=Shape("end", {"reason": TEXT}))),
    "history": _spec(TOOLS, {}, {"repo": REPO, "branch": BRANCH, "status": STATUS, "author": _str(200),
                                 "job": JOB, "sha": SHA_PREFIX, "before": BUILD_ID, "after": BUILD_ID,
                                 "limit": _int(1, 500)},
                     reply=_ok({"builds": OBJECTS, "older": BOOL, "newer": BOOL})),
    "branch_status": _spec(TOOLS, {"branch": BRANCH}, {"repo": REPO},
                           reply=_ok({"status": BADGE}, {"sha": SHA, "builds": BUILD_IDS})),
    "log_window": _spec(TOOLS, {"build": BUILD_ID}, {"offset": COUNT, "line": _int(1, 2**62),
                                                     "limit": _int(1, LOG_WINDOW_MAX)},
                        reply=_ok({"data": DATA, "offset": COUNT, "line": _int(1, 2**62), "size": COUNT,
                                   "status": STATUS})),
    "counts": _spec(TOOLS, {"since": NUMBER}, reply=_ok({"counts": OBJECT})),
    "artifacts": _spec(TOOLS, {"build": BUILD_ID}, reply=_ok({"artifacts": OBJECTS})),
    # a runner fetches the artifacts of the builds its build needs (its run's inputs)
    "fetch_artifact": _spec(TOOLS | {RUNNER}, {"build": BUILD_ID, "path": PATH}, {"offset": COUNT},
                            reply=_ok({"data": BYTES, "offset": COUNT, "size": COUNT, "eof": BOOL})),
    # the same as one stream from offset to the end, no round trip per chunk (what the tools use)
    "read_artifact": _spec(TOOLS | {RUNNER}, {"build": BUILD_ID, "path": PATH}, {"offset": COUNT},
                           stream=Stream(first=_ok({"size": COUNT}),
                                         each=Shape("chunk", {"offset": COUNT, "data": BYTES}),
                                         end=Shape("end", {"offset": COUNT}))),
    "trigger": _spec(OPERATOR, {}, {"branch": BRANCH, "rev": _str(255), "repo": REPO, "job": JOB}, reply=QUEUED),
    "rebuild": _spec(OPERATOR, {"build": BUILD_ID}, reply=QUEUED),
    # runner maintenance: a draining runner finishes what it runs and takes nothing new;
    # only a dead runner can be forgotten
    "drain": _spec(OPERATOR, {"name": NAME}, reply=_ok({"runner": OBJECT})),
    "resume": _spec(OPERATOR, {"name": NAME}, reply=_ok({"runner": OBJECT})),
    "forget": _spec(OPERATOR, {"name": NAME}, reply=_ok()),
    # a retention sweep now, or (dry_run) what one would delete
    "gc": _spec(OPERATOR, {}, {"dry_run": BOOL},
                reply=_ok({"builds": COUNT, "log_bytes": COUNT, "artifact_bytes": COUNT, "days": NUMBER,
                           "per_branch": COUNT, "dry_run": BOOL}, {"db_bytes": COUNT})),
    # git hook -> observer
    "poke": _spec({OBSERVER, OPERATOR}, {}, {"branch": BRANCH}, reply=_ok()),
    # replies and stream frames: their fields are checked against the request they answer
    "ok": _spec(SERVER, open=True),
    "error": _spec(SERVER, ERROR.required, ERROR.optional),
    "pong": _spec(SERVER, {"running": LEASES}),
    "chunk": _spec(SERVER, {"offset": COUNT, "data": TEXT_OR_BYTES}, {"times": TIMES}),
    "event": _spec(SERVER, {"event": _str(64)}, open=True),
    "end": _spec(SERVER, {}, open=True),
}
# the requests whose raw bytes a server lends its handler rather than copies (net.Connection.give_back):
# an artifact's 4 MiB chunks, where a fresh buffer and a copy of it per chunk cost 0.08 s per 100 MiB
LENT = frozenset(kind for kind, spec in MESSAGES.items() if spec.required.get("data") is LENT_BYTES)


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
    return _fields(msg, kind, spec.required, spec.optional, spec.open)


def _fields(msg: dict, where: str, required: Mapping[str, Kind], optional: Mapping[str, Kind],
            open: bool = False) -> dict:
    for name, fkind in required.items():
        if name not in msg:
            raise ProtocolError("missing_field", f"{where}: missing field {name!r}")
        fkind.validate(msg[name], f"{where}.{name}")
    for name, fkind in optional.items():
        if name in msg:
            fkind.validate(msg[name], f"{where}.{name}")
    if not open:
        extra = set(msg) - {"type"} - set(required) - set(optional)
        if extra:
            raise ProtocolError("unknown_field", f"{where}: unknown field {sorted(extra)[0][:40]!r}")
    return msg


def is_stream(kind: str) -> bool:
    spec = MESSAGES.get(kind)
    return spec is not None and spec.stream is not None


class Answers:
    """Follows the frames that answer one request of type ``request`` and
    checks each against the table: ``check`` returns the frame or raises
    ProtocolError (``bad_reply``, or the field's ``missing_field``,
    ``bad_field``, ``unknown_field``); ``done`` once the answer is complete.
    Something that is not a request in the table may be answered only by an error."""

    def __init__(self, request: str):
        spec = MESSAGES.get(request)
        self.request = request
        self.reply = spec.reply if spec is not None else None
        self.stream = spec.stream if spec is not None else None
        self.frames = 0
        self.done = False

    def expected(self) -> tuple[Shape, ...]:
        if self.stream is not None:
            if self.frames == 0 and self.stream.first is not None:
                return (self.stream.first,)
            return (self.stream.each, self.stream.end)
        return (self.reply,) if self.reply is not None else ()

    def check(self, frame: Any) -> dict:
        if self.done:
            raise ProtocolError("bad_reply", f"a frame after the answer to {self.request!r} was complete")
        kind = frame.get("type") if isinstance(frame, dict) else None
        shapes = {s.type: s for s in (*self.expected(), ERROR)}
        shape = shapes.get(kind)
        if shape is None:
            raise ProtocolError("bad_reply", f"{self.request!r} is answered by {' or '.join(shapes)}, "
                                             f"not {_short(kind if kind is not None else frame)}")
        _fields(frame, f"{self.request} reply {kind}", shape.required, shape.optional)
        self.frames += 1
        self.done = self.stream is None or shape is ERROR or shape is self.stream.end
        return frame


def check_reply(request: str, reply: Any) -> dict:
    """Check the one reply to a request of type ``request``; returns it or raises ProtocolError."""
    return Answers(request).check(reply)


def error(code: str, message: str, **extra: Any) -> dict:
    return {"type": "error", "code": code, "message": message, **extra}


def ok(**fields: Any) -> dict:
    return {"type": "ok", **fields}



# ---------------------------------------------------------------- framing

def encode(msg: dict) -> bytes:
    """The whole frame (a bulk frame's raw bytes included)."""
    head, raw = encode_parts(msg)
    return head if raw is None else head + raw


def encode_parts(msg: dict) -> tuple[bytes, bytes | None]:
    """(length and JSON, the raw bytes after it or None): a message whose
    ``data`` is bytes goes as a bulk frame, its header saying how many follow,
    so a sender writes the bytes it holds without copying them."""
    data = msg.get("data")
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data) if not isinstance(data, bytes) else data
        msg = {**{k: v for k, v in msg.items() if k != "data"}, BULK: len(raw)}
    else:
        raw = None
    body = _JSON(msg).encode()
    return HEADER.pack(len(body)) + body, raw


def bulk_header(msg: dict, count: int) -> bytes:
    """The frame of a bulk message whose ``count`` raw bytes the sender writes
    after it from elsewhere (a file): ``msg`` has no ``data``."""
    body = _JSON({**msg, BULK: count}).encode()
    return HEADER.pack(len(body)) + body


def bulk_size(frame: Any, limit: int) -> int | None:
    """How many raw bytes follow the frame whose JSON is ``frame`` (None: it is
    not a bulk frame). FatalProtocolError for a count that is not a whole
    number or is over ``limit``: the stream cannot be followed after it."""
    if not isinstance(frame, dict) or BULK not in frame:
        return None
    size = frame[BULK]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FatalProtocolError("bad_frame", f"a bulk frame's {BULK!r} must be a count of bytes, "
                                              f"got {_short(size)}")
    if size > limit:
        raise FatalProtocolError("frame_too_large", f"bulk frame of {size} bytes exceeds the limit of {limit}"
                                 + ("" if limit else " (none before the handshake is done)"))
    return size


def attach(frame: dict, raw: bytes) -> dict:
    """The message a bulk frame carries: its raw bytes become its ``data``.
    ProtocolError (the stream is still in step) when the header has a ``data`` too."""
    if "data" in frame:
        raise ProtocolError("bad_message", "a bulk frame carries its data raw, not also in its header")
    del frame[BULK]
    frame["data"] = raw
    return frame


def decode(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("bad_frame", "frame is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ProtocolError("bad_frame", "frame is not valid JSON") from None
