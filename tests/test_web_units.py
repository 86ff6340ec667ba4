"""The web process's parts without a server: log lines rendered safely, the
login's hashes, sessions and CSRF tokens, the badge, the words for times,
URL filters checked against the wire table, log windows trimmed to a page,
and the tracker that turns the watch stream into metrics and page updates."""

from __future__ import annotations

import time

import pytest

from ci.web import auth, data, logview, views
from ci.web.streams import badge_svg
from ci.web.tracker import Tracker


# ---------------------------------------------------------------- log lines

def test_log_lines_are_numbered_escaped_and_coloured():
    r = logview.LogRenderer(first_line=7)
    html = str(r.feed("\x1b[1;31mred <b>&</b>\x1b[0m plain\n"))
    assert html == ('<div class="ln" id="L7"><a href="#L7" data-n="7"></a><code>'
                    '<span class="b f1">red &lt;b&gt;&amp;&lt;/b&gt;</span> plain</code></div>\n')


def test_a_colour_carries_over_lines_and_pieces():
    r = logview.LogRenderer()
    assert str(r.feed("\x1b[32mgre")) == ""                  # no newline yet: nothing to show
    html = str(r.feed("en\nstill\x1b[39m no\n"))
    assert '<span class="f2">green</span>' in html and '<span class="f2">still</span> no' in html
    assert 'id="L2"' in html
    assert str(r.feed("tail")) == "" and 'id="L3"' in str(r.flush()) and str(r.flush()) == ""


@pytest.mark.parametrize("hostile", [
    "\x1b]52;c;cHduZWQ=\x07",          # OSC 52: write the clipboard
    "\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\",      # OSC 8 hyperlink
    "\x1b[2J\x1b[H",                   # clear the screen, cursor home
    "\x9b31m",                         # C1 CSI
    "\u202e",                          # bidi override
])
def test_what_moves_a_terminal_is_removed(hostile):
    html = str(logview.LogRenderer().feed(f"a{hostile}b\n"))
    assert "\x1b" not in html and "\x9b" not in html and "\u202e" not in html and "\x07" not in html
    assert "evil" not in html and "cHduZWQ" not in html


def test_a_carriage_return_cannot_rewrite_a_line():
    html = str(logview.LogRenderer().feed("FAILED: 3 tests\r=== passed ===\n"))
    assert "FAILED: 3 tests" in html and "=== passed ===" in html       # both shown, one line number
    assert html.count('class="ln"') == 1


def test_extended_colours_are_skipped_without_eating_text():
    style = logview.Style()
    style.apply("38;5;196;1")
    assert style.classes() == "b"
    style.apply("48;2;1;2;3;4")
    assert style.classes() == "b u"


# ---------------------------------------------------------------- login

def test_password_hashes():
    stored = auth.hash_password("s3cret")
    assert stored.startswith("scrypt$16384$8$1$") and auth.well_formed(stored)
    assert auth.check_password("s3cret", stored) and not auth.check_password("S3cret", stored)
    assert not auth.check_password("s3cret", "plain-text") and not auth.check_password("x", "scrypt$a$b$c$d$e")
    assert auth.hash_password("s3cret") != stored                    # salted


def test_sessions_tokens_and_csrf():
    gate = auth.Gate({"ada": auth.hash_password("pw")}, token="tok", session_seconds=60)
    assert gate.required and not auth.Gate({}).required
    assert gate.login("ada", "nope") is None and gate.login("eve", "pw") is None
    cookie = gate.login("ada", "pw")
    assert gate.session_user(cookie) == "ada"
    name, expiry, mac = cookie.split(":")
    assert gate.session_user(f"{name}:{int(expiry) + 999}:{mac}") is None      # tampered
    assert gate.session_user(cookie.replace(mac, mac[::-1])) is None
    assert auth.Gate(gate.users).session_user(cookie) is None                  # another process's key
    expired = auth.Gate(gate.users, session_seconds=-1)
    assert expired.session_user(expired.login("ada", "pw")) is None
    assert gate.token_ok("Bearer tok") and not gate.token_ok("Bearer tok2") and not gate.token_ok(None)
    assert gate.csrf_ok(cookie, gate.csrf(cookie)) and not gate.csrf_ok(cookie, gate.csrf("other"))
    assert not gate.csrf_ok(None, "x")


# ---------------------------------------------------------------- badge and words

@pytest.mark.parametrize("status, word", [("passed", "passing"), ("failed", "failing"), ("error", "failing"),
                                          ("running", "running"), ("unknown", "unknown"), ("???", "unknown")])
def test_the_badge_says_one_of_four_words(status, word):
    svg = badge_svg(status)
    assert f">{word}</text>" in svg and svg.startswith("<svg ") and f'aria-label="build: {word}"' in svg


def test_times_and_durations_read_at_a_glance():
    now = 1_000_000.0
    assert [views.age(now - s, now) for s in (3, 125, 7200, 86400 * 5)] == ["3s ago", "2m ago", "2h ago",
                                                                            "5d ago"]
    assert [views.duration(s) for s in (None, 1.234, 42, 125, 3725)] == ["-", "1.2s", "42s", "2m 05s",
                                                                         "1h 02m"]
    assert views.query({"branch": "a/b", "status": ""}, before=5) == "?branch=a%2Fb&before=5"
    assert views.path_part("feature/x y") == "feature/x%20y"


def test_url_filters_are_checked_against_the_wire_kinds():
    assert data.filters_from({"branch": "main", "sha": "ABC", "status": "", "job": " lint "}) == \
        {"branch": "main", "sha": "abc", "job": "lint"}
    for params, name in (({"status": "great"}, "status"), ({"sha": "xyz"}, "sha"), ({"branch": "a..b"}, "branch"),
                         ({"author": "x" * 201}, "author")):
        with pytest.raises(data.BadRequest, match=f"^{name}: expected"):
            data.filters_from(params)
    assert data.number({"limit": "20"}, "limit", 1, 500) == 20 and data.number({}, "limit") is None
    with pytest.raises(data.BadRequest, match="limit: expected a whole number from 1 to 500"):
        data.number({"limit": "0"}, "limit", 1, 500)


def test_a_window_is_trimmed_to_a_page_of_lines():
    window = {"data": "".join(f"{n}\n" for n in range(1, 11)), "offset": 100, "line": 50, "size": 999,
              "status": "running"}
    tail = data.trim(window, keep_end=True, most=3)
    assert tail["data"] == "8\n9\n10\n" and tail["line"] == 57 and tail["offset"] == 100 + len("1\n2\n3\n4\n5\n6\n7\n")
    head = data.trim(window, keep_end=False, most=3)
    assert head["data"] == "1\n2\n3\n" and head["line"] == 50 and head["offset"] == 100
    assert data.trim(window, keep_end=True, most=10) is window


# ---------------------------------------------------------------- the tracker

def build(id_: int, status: str, job: str = "", **extra) -> dict:
    now = time.time()
    return {"id": id_, "status": status, "job": job, "created_at": now - 10, "started_at": now - 4,
            "duration": 3.0 if status not in ("queued", "running") else None, **extra}


def sample(tracker: Tracker, name: str, **labels) -> float:
    value = tracker.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


def test_the_tracker_counts_each_build_once_and_knows_what_runs():
    t = Tracker()
    t.snapshot({"runners": [{"name": "r1", "state": "busy", "running": [1]}],
                "builds": [build(1, "running"), build(2, "queued"), build(3, "passed")]})
    assert t.connected and t.counts() == (1, 1, {"busy": 1})
    assert sample(t, "tinyci_builds_finished_total", status="passed", job="") == 0     # ended before we looked
    assert sample(t, "tinyci_build_queue_wait_seconds_count") == 1
    t.event({"type": "event", "event": "build", "build": build(1, "failed", job="lint")})
    t.event({"type": "event", "event": "build", "build": build(1, "failed", job="lint")})     # said twice
    assert sample(t, "tinyci_builds_finished_total", status="failed", job="lint") == 1
    assert sample(t, "tinyci_build_duration_seconds_count", job="lint") == 1
    assert sample(t, "tinyci_builds_running") == 0 and sample(t, "tinyci_builds_queued") == 1
    t.lost("connection refused")
    assert not t.connected and sample(t, "tinyci_web_dispatcher_connected") == 0
    # reconnected: build 2 ran and passed meanwhile; it was known, so it counts
    t.snapshot({"runners": [], "builds": [build(2, "passed")]})
    assert sample(t, "tinyci_builds_finished_total", status="passed", job="") == 1
    assert t.counts() == (0, 0, {})


def test_a_heartbeat_alone_does_not_wake_the_pages():
    t = Tracker()
    runner = {"name": "r1", "state": "idle", "running": [], "last_seen": 1.0}
    t.snapshot({"runners": [runner], "builds": []})
    version = t.version
    t.event({"type": "event", "event": "runner", "runner": {**runner, "last_seen": 2.0}})
    assert t.version == version
    t.event({"type": "event", "event": "runner", "runner": {**runner, "state": "dead"}})
    assert t.version == version + 1 and sample(t, "tinyci_runners", state="dead") == 1
    t.event({"type": "event", "event": "newfangled"})
    assert t.version == version + 1


def test_the_dispatchers_conditions_make_a_banner_on_every_page():
    from ci.web.views import environment
    t = Tracker()
    t.snapshot({"runners": [], "builds": [], "conditions": [
        {"name": "disk_full", "message": "disk full (12 MB free)", "since": 1.0}]})
    version = t.version
    page = environment().get_template("message.html").render(
        connected=True, problem="", version=t.version, user=None, csrf="", path="/", actions=False, asset="1",
        conditions=[f"dispatcher: {c['message']}" for c in t.conditions], code=200, title="t", message="m")
    assert '<div class="banner" id="banner" data-refresh>dispatcher: disk full (12 MB free)</div>' in page
    t.event({"type": "event", "event": "conditions", "conditions": []})
    assert t.conditions == [] and t.version == version + 1         # cleared: the pages refresh
