"""The message table as a spec, with no sockets: every message type, what it
must carry, who may send it, the reply each request gets, the error codes,
and the encoding of one frame."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from ci import protocol
from ci.protocol import DISPATCHER, OBSERVER, OPERATOR, READER, RUNNER, SERVER

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "/srv/git/app"

# One valid example of every message in the table, with every optional field, and who sends it.
EXAMPLES: dict[str, tuple[str, dict]] = {
    "hello": (SERVER, {"version": 3, "nonce": "f00d" * 8, "name": "runner:r1"}),
    "auth": (RUNNER, {"role": "runner", "id": "r1", "nonce": "beef" * 8, "to": "dispatcher", "mac": "0f" * 32}),
    "commit": (OBSERVER, {"repo": REPO, "branch": "main", "sha": SHA, "author": "Ada <ada@example.com>",
                          "subject": "Fix the build", "time": 1.5, "message": "Fix the build\n\nfor good",
                          "jobs": [{"name": "test (python=3.11)", "labels": ["linux"]},
                                   {"name": "lint", "labels": [], "needs": ["test (python=3.11)"],
                                    "skip": "branch main is not among when.branches (release)"},
                                   {"name": "publish", "labels": [], "secrets": ["PYPI_TOKEN"]}],
                          "config_error": ""}),
    "register": (RUNNER, {"name": "r1", "host": "127.0.0.1", "port": 8889, "labels": ["linux"], "slots": 2,
                          "running": [[1, 1]]}),
    "log": (RUNNER, {"build": 1, "attempt": 1, "offset": 0, "data": "hello\n"}),
    "result": (RUNNER, {"build": 1, "attempt": 1, "status": "passed", "exit_code": 0, "steps": 2,
                        "duration": 1.5, "log_size": 6,
                        "step_results": [{"name": "", "run": "make", "exit_code": 0, "duration": 1.2},
                                         {"name": "t", "run": "sleep 9", "exit_code": None, "duration": 0.1}],
                        "tests": {"passed": 3, "failed": 1, "errors": 0, "skipped": 0, "failures": ["m.t"]}}),
    "artifact": (RUNNER, {"build": 1, "attempt": 1, "path": "dist/app.tar", "offset": 0, "data": b"hello",
                          "eof": True}),
    "run": (DISPATCHER, {"build": 1, "attempt": 1, "repo": REPO, "sha": SHA, "branch": "main",
                         "steps": ["make test"], "timeout": 60.0, "env": {"CI": "1"}, "job": "test",
                         "artifacts_limit": 1000, "inputs": [{"build": 2, "job": "test (python=3.11)",
                                                              "path": "dist/app.whl"}],
                         "definition": "steps: [make test]\n", "override": False,
                         "secrets": {"PYPI_TOKEN": "pypi-secret-value"}}),
    "ping": (DISPATCHER, {}),
    "cancel": (OPERATOR, {"build": 1, "attempt": 1, "by": "ada@host"}),
    "status": (READER, {"limit": 50}),
    "build": (READER, {"build": 1}),
    "read_log": (READER, {"build": 1, "offset": 0, "follow": True, "timestamps": True, "binary": False}),
    "watch": (READER, {"limit": 50}),
    "history": (READER, {"repo": REPO, "branch": "main", "status": "failed", "author": "ada", "job": "test",
                         "sha": "0123ab", "before": 100, "after": 50, "limit": 50}),
    "branch_status": (READER, {"branch": "main", "repo": REPO}),
    "log_window": (READER, {"build": 1, "offset": 0, "line": 120, "limit": 65536}),
    "counts": (READER, {"since": 1700000000.0}),
    "artifacts": (READER, {"build": 1}),
    "fetch_artifact": (READER, {"build": 1, "path": "dist/app.tar", "offset": 0}),
    "read_artifact": (READER, {"build": 1, "path": "dist/app.tar", "offset": 0}),
    "trigger": (OPERATOR, {"branch": "main", "rev": "HEAD~1", "repo": REPO, "job": "lint"}),
    "rebuild": (OPERATOR, {"build": 1}),
    "drain": (OPERATOR, {"name": "r1"}),
    "resume": (OPERATOR, {"name": "r1"}),
    "forget": (OPERATOR, {"name": "r1"}),
    "gc": (OPERATOR, {"dry_run": True}),
    "poke": (OBSERVER, {"branch": "main"}),
    "ok": (SERVER, {}),
    "error": (SERVER, {"code": "offset", "message": "log of build 1 has 6 bytes, not 9", "expected": 6}),
    "pong": (SERVER, {"running": [[1, 1]]}),
    "chunk": (SERVER, {"offset": 0, "data": "hello\n", "times": [[0, 1700000000.5]]}),
    "event": (SERVER, {"event": "build", "build": {"id": 1}}),
    "end": (SERVER, {"status": "passed", "offset": 6}),
}

SNAPSHOT = {"type": "ok", "runners": [{"name": "r1", "state": "idle"}], "builds": [{"id": 1, "status": "passed"}],
            "pipelines": [{"sha": SHA, "status": "passed", "jobs": []}], "queue": [2],
            "conditions": [{"name": "disk_full", "message": "disk full (12 MB free)", "since": 1700000000.0}]}
# The whole answer to every request, frame by frame, with every optional field.
ANSWERS: dict[str, list[dict]] = {
    "auth": [{"type": "ok", "role": "runner", "mac": "f0" * 32}],
    "commit": [{"type": "ok", "build": 1, "builds": [1, 2], "duplicate": False}],
    "register": [{"type": "ok", "heartbeat_interval": 1.0}],
    "log": [{"type": "ok", "offset": 6}],
    "result": [{"type": "ok"}],
    "artifact": [{"type": "ok", "offset": 5}],
    "run": [{"type": "ok"}],
    "ping": [{"type": "pong", "running": [[1, 1]]}],
    "cancel": [{"type": "ok", "builds": [1]}],
    "status": [SNAPSHOT],
    "build": [{"type": "ok", "build": {"id": 1, "status": "passed"}}],
    "read_log": [{"type": "chunk", "offset": 0, "data": "hello\n"},
                 {"type": "chunk", "offset": 6, "data": "bye\n", "times": [[6, 1700000000.5]]},
                 {"type": "end", "status": "passed", "offset": 10}],
    "watch": [SNAPSHOT, {"type": "event", "event": "build", "build": {"id": 3}},
              {"type": "event", "event": "runner", "runner": {"name": "r1"}},
              {"type": "event", "event": "conditions", "conditions": []},
              {"type": "end", "reason": "watcher too slow"}],
    "history": [{"type": "ok", "builds": [{"id": 3, "status": "failed"}], "older": True, "newer": False}],
    "branch_status": [{"type": "ok", "status": "passed", "sha": SHA, "builds": [3, 4]}],
    "log_window": [{"type": "ok", "data": "line 120\n", "offset": 4000, "line": 120, "size": 9000,
                    "status": "running"}],
    "counts": [{"type": "ok", "counts": {"passed": 3, "failed": 1}}],
    "artifacts": [{"type": "ok", "artifacts": [{"path": "dist/app.tar", "size": 5}]}],
    "fetch_artifact": [{"type": "ok", "data": b"hello", "offset": 0, "size": 5, "eof": True}],
    "read_artifact": [{"type": "ok", "size": 9}, {"type": "chunk", "offset": 0, "data": b"hello"},
                      {"type": "chunk", "offset": 5, "data": b" you"}, {"type": "end", "offset": 9}],
    "trigger": [{"type": "ok", "builds": [3]}],
    "rebuild": [{"type": "ok", "builds": [4]}],
    "drain": [{"type": "ok", "runner": {"name": "r1", "state": "draining"}}],
    "resume": [{"type": "ok", "runner": {"name": "r1", "state": "idle"}}],
    "forget": [{"type": "ok"}],
    "gc": [{"type": "ok", "builds": 12, "log_bytes": 40960, "artifact_bytes": 1000, "days": 30.0, "per_branch": 0,
            "dry_run": False, "db_bytes": 8192}],
    "poke": [{"type": "ok"}],
}
REQUESTS = sorted(k for k, spec in protocol.MESSAGES.items() if spec.is_request)
STREAMS = sorted(k for k in REQUESTS if protocol.is_stream(k))


def example(kind: str) -> dict:
    return {"type": kind, **EXAMPLES[kind][1]}


def wrong(value):
    """A value of a JSON type that the field holding ``value`` does not take."""
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        return "x"
    if isinstance(value, (int, float)):
        return "7"
    return 7


def refused(msg, sender) -> protocol.ProtocolError:
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.validate(msg, sender)
    return err.value


def answer_refused(kind: str, frames: list[dict]) -> protocol.ProtocolError:
    answers = protocol.Answers(kind)
    with pytest.raises(protocol.ProtocolError) as err:
        for frame in frames:
            answers.check(frame)
    return err.value


# ---------------------------------------------------------------- the examples cover the table

def test_every_message_type_has_an_example_and_every_request_an_answer():
    assert set(EXAMPLES) == set(protocol.MESSAGES)
    assert set(ANSWERS) == set(REQUESTS)
    assert STREAMS == ["read_artifact", "read_log", "watch"]
    for kind, spec in protocol.MESSAGES.items():
        if not spec.open:       # each example shows every field its type declares
            assert set(EXAMPLES[kind][1]) == {*spec.required, *spec.optional}, kind


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_the_example_is_valid_with_and_without_its_optional_fields(kind):
    sender, _ = EXAMPLES[kind]
    assert protocol.validate(example(kind), sender) == example(kind)
    spec = protocol.MESSAGES[kind]
    bare = {k: v for k, v in example(kind).items() if k not in spec.optional}
    assert protocol.validate(bare, sender) == bare


# ---------------------------------------------------------------- requests: one case per field

@pytest.mark.parametrize("kind, name", [(k, n) for k in sorted(EXAMPLES) for n in protocol.MESSAGES[k].required])
def test_a_missing_required_field_is_named(kind, name):
    msg = {k: v for k, v in example(kind).items() if k != name}
    err = refused(msg, EXAMPLES[kind][0])
    assert (err.code, err.message) == ("missing_field", f"{kind}: missing field {name!r}")


@pytest.mark.parametrize("kind, name", [(k, n) for k, spec in sorted(protocol.MESSAGES.items())
                                        for n in (*spec.required, *spec.optional)])
def test_a_field_of_the_wrong_kind_is_named(kind, name):
    msg = example(kind)
    msg[name] = wrong(msg[name])
    err = refused(msg, EXAMPLES[kind][0])
    assert err.code == "bad_field"
    assert err.message.startswith(f"{kind}.{name}: expected ")


@pytest.mark.parametrize("kind", sorted(k for k, spec in protocol.MESSAGES.items() if not spec.open))
def test_an_unknown_field_is_named(kind):
    err = refused({**example(kind), "colour": "blue"}, EXAMPLES[kind][0])
    assert (err.code, err.message) == ("unknown_field", f"{kind}: unknown field 'colour'")


@pytest.mark.parametrize("kind", sorted(k for k, spec in protocol.MESSAGES.items() if spec.open))
def test_replies_whose_fields_depend_on_the_request_are_open_until_checked_against_it(kind):
    assert protocol.validate({**example(kind), "colour": "blue"}, SERVER)["colour"] == "blue"


@pytest.mark.parametrize("kind, sender", [(k, role) for k in sorted(EXAMPLES)
                                          for role in (*protocol.ROLES, SERVER)
                                          if role not in protocol.MESSAGES[k].senders])
def test_a_sender_not_allowed_is_forbidden(kind, sender):
    err = refused(example(kind), sender)
    assert (err.code, err.message) == ("forbidden", f"role {sender!r} may not send {kind!r}")


def test_who_may_send_what():
    senders = {k: spec.senders for k, spec in protocol.MESSAGES.items()}
    assert senders["commit"] == {OBSERVER}
    assert senders["run"] == senders["ping"] == {DISPATCHER}
    assert senders["cancel"] == {DISPATCHER, OPERATOR}
    assert senders["poke"] == {OBSERVER, OPERATOR}
    assert senders["trigger"] == senders["rebuild"] == senders["gc"] == {OPERATOR}
    assert senders["drain"] == senders["resume"] == senders["forget"] == {OPERATOR}
    for kind in ("status", "build", "read_log", "watch", "artifacts", "history",
                 "branch_status", "log_window", "counts"):
        assert senders[kind] == {READER, OPERATOR}, kind        # operators may read too
    # a runner fetches the artifacts of the builds its build needs (run.inputs)
    assert senders["fetch_artifact"] == senders["read_artifact"] == {READER, OPERATOR, RUNNER}
    for kind in ("register", "log", "result", "artifact"):
        assert senders[kind] == {RUNNER}, kind
    for kind in ("hello", "ok", "error", "pong", "chunk", "event", "end"):
        assert senders[kind] == {SERVER}, kind


@pytest.mark.parametrize("msg, code, words", [
    ([1, 2], "bad_message", "JSON object"),
    ({"kind": "x"}, "bad_message", "'type'"),
    ({"type": 7}, "bad_message", "'type'"),
    ({"type": "launch"}, "unknown_type", "launch"),
    ({**example("commit"), "sha": SHA.upper()}, "bad_field", "commit.sha"),
    ({**example("commit"), "branch": "a..b"}, "bad_field", "commit.branch"),
    ({**example("commit"), "branch": "-rf"}, "bad_field", "commit.branch"),
    ({**example("commit"), "repo": "--upload-pack=evil"}, "bad_field", "commit.repo"),
    ({**example("commit"), "repo": "/r\n"}, "bad_field", "commit.repo"),
    ({**example("commit"), "time": True}, "bad_field", "commit.time"),
    ({**example("commit"), "time": float("nan")}, "bad_field", "commit.time"),
    ({**example("commit"), "jobs": []}, "bad_field", "commit.jobs"),
    ({**example("commit"), "jobs": [{"name": "a", "labels": [], "needs": ["no (good"]}]}, "bad_field", "commit.jobs"),
    ({**example("commit"), "jobs": [{"name": "a", "labels": [], "extra": 1}]}, "bad_field", "commit.jobs"),
    ({**example("commit"), "jobs": [{"name": "a (b)", "labels": []}]}, "bad_field", "commit.jobs"),
])
def test_validate_names_the_problem(msg, code, words):
    err = refused(msg, OBSERVER)
    assert err.code == code
    assert words in err.message


@pytest.mark.parametrize("kind, name, value", [
    ("log", "build", 0), ("log", "attempt", -1), ("register", "slots", 0), ("register", "port", 65536),
    ("register", "name", "has space"), ("register", "labels", ["ok", "not ok"]),
    ("register", "running", [[1]]), ("run", "env", {"1BAD": "x"}), ("run", "env", {"A": 1}),
    ("result", "status", "queued"), ("cancel", "by", "x" * 201), ("trigger", "repo", ""),
])
def test_values_out_of_range_are_bad_fields(kind, name, value):
    err = refused({**example(kind), name: value}, EXAMPLES[kind][0])
    assert err.code == "bad_field" and err.message.startswith(f"{kind}.{name}:")


# ---------------------------------------------------------------- replies

@pytest.mark.parametrize("kind", REQUESTS)
def test_the_whole_answer_is_allowed_and_complete_only_at_its_end(kind):
    answers = protocol.Answers(kind)
    for frame in ANSWERS[kind]:
        assert not answers.done
        assert answers.check(dict(frame)) == frame
    assert answers.done


@pytest.mark.parametrize("kind", REQUESTS)
def test_an_error_may_answer_any_request_and_ends_it(kind):
    answers = protocol.Answers(kind)
    assert answers.check(protocol.error("internal", "it broke"))["code"] == "internal"
    assert answers.done
    assert protocol.check_reply(kind, protocol.error("offset", "gap", expected=3))["expected"] == 3


@pytest.mark.parametrize("kind", STREAMS)
def test_an_error_ends_a_stream_after_some_frames(kind):
    answers = protocol.Answers(kind)
    answers.check(ANSWERS[kind][0])
    answers.check(protocol.error("internal", "it broke"))
    assert answers.done


def _shape(kind: str, i: int, frame: dict) -> protocol.Shape:
    """The table's shape for frame ``i`` of the answer to ``kind``."""
    spec = protocol.MESSAGES[kind]
    if spec.stream is None:
        return spec.reply
    if i == 0 and spec.stream.first is not None:
        return spec.stream.first
    return spec.stream.end if frame["type"] == spec.stream.end.type else spec.stream.each


def _reply_cases(required_only: bool = False):
    """(request, the frames before, the frame, a field) for every field of every answer frame."""
    for kind in REQUESTS:
        frames = ANSWERS[kind]
        for i, frame in enumerate(frames):
            shape = _shape(kind, i, frame)
            for name in frame:
                if name != "type" and (name in shape.required or not required_only):
                    yield kind, frames[:i], frame, name


@pytest.mark.parametrize("kind, before, frame, name", list(_reply_cases(required_only=True)))
def test_a_reply_missing_a_declared_field_is_refused(kind, before, frame, name):
    err = answer_refused(kind, [*before, {k: v for k, v in frame.items() if k != name}])
    assert (err.code, err.message) == ("missing_field", f"{kind} reply {frame['type']}: missing field {name!r}")


@pytest.mark.parametrize("kind, before, frame, name", list(_reply_cases()))
def test_a_reply_field_of_the_wrong_kind_is_refused(kind, before, frame, name):
    err = answer_refused(kind, [*before, {**frame, name: wrong(frame[name])}])
    assert err.code == "bad_field"
    assert err.message.startswith(f"{kind} reply {frame['type']}.{name}: expected ")


def test_every_declared_reply_field_has_an_example():
    for kind in REQUESTS:
        for i, frame in enumerate(ANSWERS[kind]):
            shape = _shape(kind, i, frame)
            assert set(frame) - {"type"} <= {*shape.required, *shape.optional}, (kind, i)
    shown = {(kind, _shape(kind, i, f).type, name) for kind in REQUESTS
             for i, f in enumerate(ANSWERS[kind]) for name in f}
    for kind in REQUESTS:
        spec = protocol.MESSAGES[kind]
        shapes = [spec.reply] if spec.stream is None else [s for s in (spec.stream.first, spec.stream.each,
                                                                       spec.stream.end) if s]
        for shape in shapes:
            for name in (*shape.required, *shape.optional):
                assert (kind, shape.type, name) in shown, (kind, shape.type, name)


@pytest.mark.parametrize("kind", REQUESTS)
def test_a_reply_with_an_undeclared_field_is_refused(kind):
    err = answer_refused(kind, [{**ANSWERS[kind][0], "colour": "blue"}])
    assert err.code == "unknown_field" and "'colour'" in err.message
    err = answer_refused(kind, [{**protocol.error("busy", "later"), "colour": "blue"}])
    assert err.code == "unknown_field"


@pytest.mark.parametrize("kind", REQUESTS)
def test_a_reply_of_a_type_the_table_does_not_give_that_request_is_refused(kind):
    first = ANSWERS[kind][0]["type"]
    other = "pong" if first != "pong" else "ok"
    err = answer_refused(kind, [{"type": other, "running": []}])
    assert err.code == "bad_reply"
    assert err.message.startswith(f"{kind!r} is answered by {first}")


def test_what_answers_each_request():
    """The reply types and fields, as a reader of the table sees them."""
    def shape(s):
        return s.type, sorted(s.required), sorted(s.optional)
    replies = {k: shape(protocol.MESSAGES[k].reply) for k in REQUESTS if k not in STREAMS}
    assert replies == {
        "auth": ("ok", ["mac", "role"], []),
        "commit": ("ok", ["build", "builds", "duplicate"], []),
        "register": ("ok", ["heartbeat_interval"], []),
        "log": ("ok", ["offset"], []),
        "result": ("ok", [], []),
        "artifact": ("ok", ["offset"], []),
        "run": ("ok", [], []),
        "ping": ("pong", ["running"], []),
        "cancel": ("ok", [], ["builds"]),
        "status": ("ok", ["builds", "pipelines", "queue", "runners"], ["conditions"]),
        "build": ("ok", ["build"], []),
        "artifacts": ("ok", ["artifacts"], []),
        "history": ("ok", ["builds", "newer", "older"], []),
        "branch_status": ("ok", ["status"], ["builds", "sha"]),
        "log_window": ("ok", ["data", "line", "offset", "size", "status"], []),
        "counts": ("ok", ["counts"], []),
        "fetch_artifact": ("ok", ["data", "eof", "offset", "size"], []),
        "trigger": ("ok", ["builds"], []),
        "rebuild": ("ok", ["builds"], []),
        "drain": ("ok", ["runner"], []),
        "resume": ("ok", ["runner"], []),
        "forget": ("ok", [], []),
        "gc": ("ok", ["artifact_bytes", "builds", "days", "dry_run", "log_bytes", "per_branch"], ["db_bytes"]),
        "poke": ("ok", [], []),
    }
    read_log, watch = protocol.MESSAGES["read_log"].stream, protocol.MESSAGES["watch"].stream
    assert read_log.first is None
    assert (shape(read_log.each), shape(read_log.end)) == (("chunk", ["data", "offset"], ["times"]),
                                                           ("end", ["offset", "status"], []))
    assert watch.first == protocol.MESSAGES["status"].reply        # the snapshot is a status reply
    assert (shape(watch.each), shape(watch.end)) == (("event", ["event"], ["build", "conditions", "runner"]),
                                                     ("end", ["reason"], []))
    read_artifact = protocol.MESSAGES["read_artifact"].stream
    assert (shape(read_artifact.first), shape(read_artifact.each), shape(read_artifact.end)) == (
        ("ok", ["size"], []), ("chunk", ["data", "offset"], []), ("end", ["offset"], []))
    assert shape(protocol.ERROR) == ("error", ["code", "message"], ["expected"])


def test_a_stream_keeps_its_order():
    snapshot, event, end = ANSWERS["watch"][0], ANSWERS["watch"][1], ANSWERS["watch"][-1]
    assert answer_refused("watch", [event]).code == "bad_reply"             # the snapshot comes first
    assert answer_refused("watch", [snapshot, snapshot]).code == "bad_reply"  # and only once
    assert answer_refused("watch", [snapshot, end, event]).code == "bad_reply"  # nothing after the end
    assert answer_refused("read_log", [{"type": "end", "status": "passed", "offset": 0},
                                       {"type": "chunk", "offset": 0, "data": ""}]).code == "bad_reply"
    err = answer_refused("read_log", [{"type": "event", "event": "build"}])
    assert err.message.startswith("'read_log' is answered by chunk or end or error")
    # a kind of event this client does not know is passed on (a viewer skips it), a field it does not know is not
    assert answer_refused("watch", [snapshot, {"type": "event", "event": "pipeline", "pipeline": {}}]).code \
        == "unknown_field"
    answers = protocol.Answers("watch")
    answers.check(snapshot)
    assert answers.check({"type": "event", "event": "pipeline"})["event"] == "pipeline"
    assert answer_refused("watch", [snapshot, {"type": "event", "event": ""}]).code == "bad_field"


def test_a_plain_request_gets_one_frame_only():
    answers = protocol.Answers("log")
    answers.check({"type": "ok", "offset": 1})
    with pytest.raises(protocol.ProtocolError) as err:
        answers.check({"type": "ok", "offset": 2})
    assert err.value.code == "bad_reply" and "after the answer to 'log'" in err.value.message


@pytest.mark.parametrize("kind", ["hello", "ok", "error", "pong", "chunk", "event", "end", "launch"])
def test_what_is_not_a_request_is_answered_only_by_an_error(kind):
    assert protocol.check_reply(kind, protocol.error("forbidden", "no"))["code"] == "forbidden"
    assert answer_refused(kind, [{"type": "ok"}]).code == "bad_reply"


@pytest.mark.parametrize("value", [None, [], "ok", 3, {"kind": "ok"}])
def test_a_reply_that_is_not_a_typed_object_is_refused(value):
    assert answer_refused("status", [value]).code == "bad_reply"


def test_a_heartbeat_interval_must_be_above_zero():
    for bad in (0, -1.0, True, float("inf")):
        assert answer_refused("register", [{"type": "ok", "heartbeat_interval": bad}]).code == "bad_field"


# ---------------------------------------------------------------- error codes

ROOT = Path(__file__).resolve().parents[1]
# error("code", ...), SomeError("code", ...), code == "code"
CODE_USES = re.compile(r"""(?:\berror|\b[A-Z]\w*Error)\(\s*["'](\w+)["']|\bcode\s*[!=]=\s*["'](\w+)["']""")


def test_every_error_code_the_daemons_use_is_declared_once_with_its_meaning():
    used = {}
    for path in sorted((ROOT / "ci").glob("*.py")):
        for match in CODE_USES.finditer(path.read_text()):
            used.setdefault(match[1] or match[2], path.name)
    assert {"stale", "offset", "busy", "not_found", "forbidden", "internal", "auth_failed"} <= set(used)
    undeclared = {code: where for code, where in used.items() if code not in protocol.ERRORS}
    assert not undeclared, f"error codes used but not in protocol.ERRORS: {undeclared}"
    assert all(meaning.strip() for meaning in protocol.ERRORS.values())


def test_the_module_documentation_lists_every_request():
    doc = protocol.__doc__
    for kind in REQUESTS:
        if kind != "auth":
            assert re.search(rf"\s{kind}\s", doc), kind


# ---------------------------------------------------------------- framing

def test_encode_decode_round_trip():
    frame = protocol.encode({"type": "ping"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert protocol.decode(frame[4:]) == {"type": "ping"}
    text = {"type": "chunk", "offset": 0, "data": "ünïcode ✓"}
    assert protocol.decode(protocol.encode(text)[4:]) == text


@pytest.mark.parametrize("body, code", [
    (b"\xff\xfe", "bad_frame"),
    (b"{not json", "bad_frame"),
    (b"[" * 100_000 + b"]" * 100_000, "bad_frame"),
])
def test_decode_rejects_bad_payloads(body, code):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode(body)
    assert err.value.code == code


# ---------------------------------------------------------------- bulk frames

def test_a_message_with_bytes_is_a_bulk_frame_and_comes_back_the_same():
    msg = {"type": "artifact", "build": 1, "attempt": 1, "path": "a", "offset": 0, "data": b"\x00\xff{}", "eof": True}
    head, raw = protocol.encode_parts(msg)
    header = protocol.decode(head[4:])
    assert raw == b"\x00\xff{}" and header[protocol.BULK] == 4 and "data" not in header
    assert protocol.encode(msg) == head + raw
    assert protocol.bulk_size(header, 4) == 4
    assert protocol.validate(protocol.attach(header, raw), RUNNER) == msg
    assert protocol.bulk_size({"type": "status"}, 0) is None          # a plain frame
    assert protocol.encode_parts({"type": "log", "data": "text"})[1] is None     # text stays JSON


@pytest.mark.parametrize("count, code", [(-1, "bad_frame"), ("4", "bad_frame"), (2.0, "bad_frame"),
                                         (False, "bad_frame"), (5, "frame_too_large")])
def test_a_bulk_count_that_is_not_a_count_or_over_the_limit_is_fatal(count, code):
    with pytest.raises(protocol.FatalProtocolError) as err:
        protocol.bulk_size({"type": "artifact", protocol.BULK: count}, 4)
    assert err.value.code == code


def test_bytes_are_only_where_the_table_says_and_never_from_json():
    assert refused({**example("artifact"), "data": "aGVsbG8="}, RUNNER).code == "bad_field"     # no base64
    assert refused({**example("status"), "data": b"x"}, READER).code == "unknown_field"
    with pytest.raises(protocol.ProtocolError):
        protocol.attach({"type": "log", protocol.BULK: 1, "data": "x"}, b"y")
