"""`tinyci web` against real daemons, over real HTTP: the pages and the JSON
API, history filters and paging, a build's log (windows of a big one, the
plain text), artifacts, the badge, the metrics, a dispatcher that goes away
and comes back, the login, and peer text that stays text."""

from __future__ import annotations

import http.client
import json
import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import Cluster, finished, free_port, tinyci, wait_until
from web_site import Site, start_site, start_web

HOSTILE = "<img src=x onerror=alert(1)>"
COLOUR_STEP = "printf 'plain \\033[31mred\\033[0m \\033]52;c;cHduZWQ=\\007done\\n'"


def builds_of(c: Cluster, count: int, what: str = "builds") -> list[dict]:
    return c.wait_builds(lambda b: len(b) >= count and finished(b), what, timeout=60)


@pytest.fixture
def site(cluster, repo):
    """A dispatcher, one runner, the observer on ``repo`` and a web process; (cluster, site, repo)."""
    c, s = start_site(cluster, repo)
    builds_of(c, 1, "the first build")
    return c, s, repo


# ---------------------------------------------------------------- pages and API

def test_every_page_shows_the_build_and_keeps_peer_text_as_text(site):
    c, s, repo = site
    sha = repo.commit(HOSTILE, {"build.sh": f"echo '{HOSTILE}'; {COLOUR_STEP}\n"})
    build = next(b for b in builds_of(c, 2) if b["sha"] == sha)
    escaped = "&lt;img src=x onerror=alert(1)&gt;"
    for path in ("/", "/builds", f"/builds/{build['id']}", f"/commits/{sha}", "/branches/main"):
        page = s.ok(path).text
        assert escaped in page, path
        assert "<img src=x" not in page, path
        assert page.count("<script") == 1 and 'src="/static/app.js' in page, path     # ours only
    page = s.ok(f"/builds/{build['id']}").text
    assert '<span class="f1">red</span>' in page                    # colour kept, as a class
    assert "\x1b" not in page and "\x07" not in page and "cHduZWQ" not in page     # OSC 52 gone
    assert 'id="L1"' in page and 'href="#L1"' in page
    assert s.json(f"/api/builds/{build['id']}")["build"]["subject"] == HOSTILE      # JSON: the text itself
    overview = s.ok("/").text
    assert "r1" in overview and "idle" in overview and "in the last hour" in overview


def test_the_json_api_matches_the_pages(site):
    c, s, repo = site
    runners = s.json("/api/runners")["runners"]
    assert [(r["name"], r["state"]) for r in runners] == [("r1", "idle")]
    listed = s.json("/api/builds")
    assert listed["older"] is False and listed["next"] is None
    build = listed["builds"][0]
    one = s.json(f"/api/builds/{build['id']}")
    assert one["build"] == {**build, "steps": [{"name": "", "run": "sh build.sh", "exit_code": 0,
                                                "duration": one["build"]["steps"][0]["duration"]}]}
    assert one["log"]["url"] == f"/builds/{build['id']}/log" and one["log"]["status"] == "passed"
    assert one["log"]["data"].endswith(f"=== passed (exit 0) in {one['log']['data'].rsplit(' in ', 1)[1]}")
    assert s.json("/api/queue") == {"queue": [], "queued": 0}
    assert s.get("/api/builds/999").status == 404
    bad = s.get("/api/builds?status=bogus")
    assert bad.status == 400 and "status" in bad.json()["error"]
    assert s.get("/api/builds?sha=xyz").status == 400


def test_history_filters_and_keyset_paging(site):
    c, s, repo = site
    shas = {}
    for n in range(3):
        shas[f"main{n}"] = repo.commit(f"main change {n}", {"build.sh": "exit 0\n"})
    bob = {**repo.env, "GIT_AUTHOR_NAME": "Bob Builder", "GIT_AUTHOR_EMAIL": "bob@example.com"}
    # main's commits recorded first: a new branch dev shows its head, which would otherwise race them
    c.wait_builds(lambda b: shas["main2"] in {x["sha"] for x in b}, "main's commits")
    repo.git("checkout", "-q", "-b", "dev")
    shas["dev"] = repo.commit("dev fails", {"build.sh": "exit 3\n"}, env=bob)
    builds_of(c, 5)
    assert [b["sha"] for b in s.json("/api/builds?branch=dev")["builds"]] == [shas["dev"]]
    assert [b["sha"] for b in s.json("/api/builds?status=failed")["builds"]] == [shas["dev"]]
    assert [b["sha"] for b in s.json("/api/builds?author=BOB")["builds"]] == [shas["dev"]]
    assert [b["sha"] for b in s.json(f"/api/builds?sha={shas['main1'][:7]}")["builds"]] == [shas["main1"]]
    assert s.json("/api/builds?branch=main&author=bob")["builds"] == []

    first = s.json("/api/builds?limit=2")
    assert len(first["builds"]) == 2 and first["older"] and not first["newer"]
    second = s.json(first["next"])
    assert second["newer"] and second["prev"]
    assert [b["id"] for b in s.json(second["prev"])["builds"]] == [b["id"] for b in first["builds"]]
    seen, page = [], first
    while True:
        seen += [b["id"] for b in page["builds"]]
        if not page["next"]:
            break
        page = s.json(page["next"])
    assert seen == sorted(seen, reverse=True) and len(seen) == 5

    html = s.ok("/builds?branch=dev").text
    assert "dev fails" in html and "main change" not in html
    assert 'value="dev"' in html                                     # the form shows the filter
    paged = s.ok("/builds?limit=2").text
    assert re.search(r'rel="next" href="/builds\?limit=2&amp;before=\d+"', paged)


def test_a_build_page_links_artifacts_and_the_plain_log(site):
    c, s, repo = site
    ci = "artifacts: [out/*]\nsteps:\n  - mkdir -p out && printf 'report' > out/report.txt\n" \
         "  - printf '<script>alert(1)</script>' > out/page.html\n"
    sha = repo.commit("with artifacts", {".ci.yaml": ci})
    build = next(b for b in builds_of(c, 2) if b["sha"] == sha)
    page = s.ok(f"/builds/{build['id']}").text
    assert f'href="/builds/{build["id"]}/artifacts/out/report.txt"' in page
    assert page.count('<li class="step">') == 2 and "&gt; out/page.html</code>" in page and "exit 0" in page
    got = s.get(f"/builds/{build['id']}/artifacts/out/report.txt")
    assert got.status == 200 and got.text == "report"
    assert got.headers["content-disposition"] == "attachment; filename*=UTF-8''report.txt"
    html = s.get(f"/builds/{build['id']}/artifacts/out/page.html")
    assert html.headers["content-type"] == "application/octet-stream"     # never a page of this site
    assert html.headers["x-content-type-options"] == "nosniff"
    assert s.get(f"/builds/{build['id']}/artifacts/../../ci.db").status == 404
    assert s.get(f"/builds/{build['id']}/artifacts/out/none.txt").status == 404
    plain = s.get(f"/builds/{build['id']}/log")
    assert plain.status == 200 and plain.text == c.log(build["id"])
    assert plain.headers["content-type"] == "text/plain; charset=utf-8"
    assert s.get("/builds/999/log").status == 404


def test_a_big_log_is_shown_by_windows_with_true_line_numbers(site):
    c, s, repo = site
    sha = repo.commit("loud", {"build.sh": "seq 1 300000 | sed 's/^/out /'\n"})     # ~3 MB
    build = next(b for b in builds_of(c, 2) if b["sha"] == sha)
    text = c.log(build["id"])
    lines = text.split("\n")
    page = s.ok(f"/builds/{build['id']}")
    assert len(page.text) < 400_000                                    # a window, not 3 MB
    last = len(lines) - 1                                              # the log ends with a newline
    assert f'id="L{last}"' in page.text and "=== passed" in page.text
    number = lines.index("out 150000") + 1
    at = s.ok(f"/builds/{build['id']}?line={number}").text
    assert re.search(rf'id="L{number}"><a href="#L{number}" data-n="{number}"></a><code>out 150000</code>', at)
    assert "&uarr; earlier" in at and "later &darr;" in at
    early = re.search(r'href="\?offset=(\d+)">&uarr; earlier', page.text)
    assert early and s.ok(f"/builds/{build['id']}?offset={early[1]}").status == 200


def test_the_badge_follows_the_newest_finished_pipeline(site):
    c, s, repo = site
    badge = s.get("/badge/main.svg")
    assert badge.status == 200 and badge.headers["content-type"].startswith("image/svg+xml")
    assert ">passing<" in badge.text
    assert ">unknown<" in s.get("/badge/nope.svg").text
    repo.git("checkout", "-q", "-b", "feature/x")
    repo.commit("break it", {"build.sh": "exit 1\n"})
    builds_of(c, 2)
    assert ">failing<" in s.get("/badge/feature/x.svg").text
    assert ">passing<" in s.get("/badge/main.svg").text
    assert s.get("/badge/main").status == 404


def test_metrics_count_what_finished_while_watching(site):
    c, s, repo = site
    wait_until(lambda: "tinyci_web_dispatcher_connected 1.0" in s.ok("/metrics").text, 10, "the web to connect")
    repo.commit("good", {"build.sh": "exit 0\n"})
    builds_of(c, 2)
    repo.commit("bad", {"build.sh": "exit 1\n"})
    builds_of(c, 3)

    def metric(name: str) -> float:
        found = re.search(rf"^{re.escape(name)} (\S+)$", s.ok("/metrics").text, re.M)
        return float(found[1]) if found else 0.0

    wait_until(lambda: metric('tinyci_builds_finished_total{job="",status="failed"}') == 1.0, 10,
               "the failed build counted")
    assert metric('tinyci_builds_finished_total{job="",status="passed"}') >= 1.0
    # the runner shows idle at its next heartbeat
    wait_until(lambda: metric('tinyci_runners{state="idle"}') == 1.0, 10, "the runner idle")
    text = s.ok("/metrics").text
    assert "tinyci_builds_queued 0.0" in text and "tinyci_builds_running 0.0" in text
    assert re.search(r'^tinyci_build_duration_seconds_count\{job=""\} [1-9]', text, re.M)
    assert re.search(r"^tinyci_build_queue_wait_seconds_count [1-9]", text, re.M)


def test_security_headers_on_every_response(site):
    c, s, repo = site
    for path in ("/", "/api/builds", "/static/style.css", "/badge/main.svg", "/builds/1/log", "/nowhere"):
        headers = s.get(path).headers
        assert "script-src 'self'" in headers["content-security-policy"], path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["x-frame-options"] == "DENY", path
    assert s.get("/nowhere").status == 404


# ---------------------------------------------------------------- live

def _sse(base: str, path: str, until, timeout: float = 20.0) -> list[tuple[str, dict]]:
    """Read server-sent events from ``path`` until ``until(events)``; bounded."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events, event, deadline = [], None, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(events):
            line = response.fp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    finally:
        conn.close()
    return events


def test_a_page_hears_of_changes_and_a_running_log_arrives(site, tmp_path):
    c, s, repo = site
    gate = tmp_path / "go"
    repo.commit("slow", {"build.sh": f"echo first; while [ ! -e {gate} ]; do sleep 0.05; done; echo second\n"})
    c.wait_builds(lambda b: b[0]["status"] == "running" and "first" in c.log(b[0]["id"]), "the build to run")
    build = c.builds()[0]
    page = s.ok(f"/builds/{build['id']}").text
    follow = re.search(r'data-follow="([^"]+)" data-offset="(\d+)" data-line="(\d+)"', page)
    assert follow, "a running build's page follows its log"
    gate.touch()
    events = _sse(s.base, f"{follow[1]}?offset={follow[2]}&line={follow[3]}",
                  lambda ev: any(kind == "end" for kind, _ in ev))
    html = "".join(data["html"] for _, data in events)
    assert ">second</code>" in html and ">first</code>" not in html     # only what came after the page
    assert events[-1] == ("end", {"html": events[-1][1]["html"], "status": "passed"})
    version = int(re.search(r'data-version="(\d+)"', s.ok("/").text)[1])
    repo.commit("another", {"build.sh": "exit 0\n"})
    changes = _sse(s.base, f"/events?v={version}", lambda ev: any(k == "change" for k, _ in ev))
    assert changes and changes[0][1]["version"] > version


# ---------------------------------------------------------------- the dispatcher away

def test_the_pages_say_when_the_dispatcher_is_away_and_recover(cluster, repo):
    c = cluster()
    port = free_port()
    c.dispatcher(port=port)
    _, s = start_web(c)
    assert s.ok("/").status == 200
    c.disp.kill()
    page = s.get("/")
    assert page.status == 503 and "cannot reach the dispatcher" in page.text and "connection refused" in page.text
    assert s.get("/api/builds").json() == {"error": f"cannot reach the dispatcher at {c.disp.addr} "
                                                    f"(connection refused)"}
    c.dispatcher(port=port)
    wait_until(lambda: s.get("/").status == 200, 15, "the pages back")
    wait_until(lambda: 'class="conn up"' in s.get("/").text, 15, "the live link back")


# ---------------------------------------------------------------- who may look

def test_a_public_address_needs_a_login(tmp_path):
    done = tinyci("web", "--host", "0.0.0.0", "--port", "0", cwd=tmp_path)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0: no login is configured" in done.stderr
    assert "web.users" in done.stderr and "--insecure" in done.stderr and "Traceback" not in done.stderr


def test_login_session_token_and_csrf(cluster, repo):
    from ci.web.auth import hash_password
    c = cluster(extra={"web": {"users": {"ada": hash_password("s3cret")}, "token": "tok-123"}})
    c.dispatcher()
    _, s = start_web(c)
    first = s.get("/builds?branch=main")
    where = urlsplit(first.headers["location"])
    assert first.status == 303 and where.path == "/login"
    assert parse_qs(where.query) == {"next": ["/builds?branch=main"]}
    assert s.get("/api/builds").status == 401 and s.get("/metrics").status == 401
    assert s.get("/api/builds", Authorization="Bearer tok-123").status == 200
    assert s.get("/api/builds", Authorization="Bearer wrong").status == 401
    assert s.get("/static/style.css").status == 200
    assert s.request("/login", {"user": "ada", "password": "s3cret"}).status == 403       # no CSRF token
    form = s.ok("/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', form)[1]
    assert s.request("/login", {"user": "ada", "password": "nope", "csrf": token}).status == 401
    assert s.request("/login", {"user": "eve", "password": "s3cret", "csrf": token}).status == 401
    other = Site(s.base, {})
    assert other.request("/login", {"user": "ada", "password": "s3cret", "csrf": token},
                         {"Origin": "http://evil.example"}).status == 403
    done = s.request("/login", {"user": "ada", "password": "s3cret", "csrf": token, "next": "/builds"})
    assert done.status == 303 and done.headers["location"] == "/builds"
    assert "tinyci_session" in s.cookies and "HttpOnly" in done.headers["set-cookie"]
    page = s.ok("/")
    assert "ada" in page.text
    out_token = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
    assert s.request("/logout", {"csrf": "forged"}).status == 403
    assert s.request("/logout", {"csrf": out_token}).status == 303
    assert s.get("/").status == 303


# ---------------------------------------------------------------- tinyci up

@pytest.mark.slow
def test_up_starts_the_web_page_with_the_reader_secret_only(tmp_path):
    from test_cli import Up
    run = Up(tmp_path, "--demo", "--port", "0", "--runners", "1", "--interval", "0.2")
    try:
        run.read_until("Press Ctrl-C")
        children = run.children()
        url, pid = children["web"]
        assert run.lines[0] == f"tinyci is up: {url}\n"
        environ = dict(item.split("=", 1) for item in
                       open(f"/proc/{pid}/environ").read().split("\0") if "=" in item)
        assert "TINYCI_AUTH_SECRET" not in environ
        assert environ["TINYCI_AUTH_READER_SECRET"] == (tmp_path / "data" / "secret").read_text().strip()
        site = Site(url)
        builds = wait_until(lambda: [b for b in site.json("/api/builds")["builds"] if b["status"] == "passed"],
                            90, "the demo's first build passed, seen on the web page")
        assert builds[0]["subject"] == "Add calc and its test"
    finally:
        assert run.stop() == 0


def test_up_without_the_web_page(tmp_path):
    from ci import up
    from ci.cli import build_parser
    args = build_parser("up").parse_args(["up", "--demo", "--data", str(tmp_path), "--no-web"])
    assert up.make_plan(args).web_port is None
    args = build_parser("up").parse_args(["up", "--demo", "--data", str(tmp_path)])
    assert up.make_plan(args).web_port == 8080
    args = build_parser("up").parse_args(["up", "--demo", "--data", str(tmp_path), "--port", "0"])
    assert up.make_plan(args).web_port == 0                  # free ports for all, the page too
    done = tinyci("up", "--demo", "--data", str(tmp_path), "--web-port", "70000", cwd=tmp_path)
    assert done.returncode == 2 and "--web-port must be a port 0-65535" in done.stderr


# ---------------------------------------------------------------- actions

def _login(s: Site, user: str = "ada", password: str = "s3cret") -> None:
    token = re.search(r'name="csrf" value="([^"]+)"', s.ok("/login").text)[1]
    assert s.request("/login", {"user": user, "password": password, "csrf": token}).status == 303


def _csrf(s: Site, path: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', s.ok(path).text)[1]


def test_logged_in_users_rebuild_cancel_and_trigger_when_actions_are_on(cluster, repo, tmp_path):
    from ci.web.auth import hash_password
    c = cluster(extra={"web": {"users": {"ada": hash_password("s3cret")}, "token": "tok", "actions": True}})
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    _, s = start_web(c)
    builds_of(c, 1)
    assert s.request("/builds/1/rebuild", {}).status == 401                       # nobody logged in
    assert s.request("/builds/1/rebuild", {}, {"Authorization": "Bearer tok"}).status == 403   # a token reads only
    _login(s)
    page = s.ok("/builds/1").text
    assert 'action="/builds/1/rebuild"' in page and 'action="/builds/1/cancel"' not in page
    assert s.request("/builds/1/rebuild", {"csrf": "forged"}).status == 403
    token = _csrf(s, "/builds/1")
    assert s.request("/builds/1/rebuild", {"csrf": token}, {"Origin": "http://evil.example"}).status == 403
    done = s.request("/builds/1/rebuild", {"csrf": token})
    assert done.status == 303 and done.headers["location"] == "/builds/2"
    assert s.json("/api/builds/2")["build"]["reason"] == "rebuild of 1"

    gate = tmp_path / "go"
    repo.commit("slow", {"build.sh": f"while [ ! -e {gate} ]; do sleep 0.05; done\n"})
    slow = c.wait_builds(lambda b: b[0]["status"] == "running" and b[0]["subject"] == "slow", "running")[0]
    page = s.ok(f"/builds/{slow['id']}").text
    assert f'action="/builds/{slow["id"]}/cancel"' in page
    assert s.request(f"/builds/{slow['id']}/cancel", {"csrf": token}).status == 303
    c.wait_builds(lambda b: any(x["id"] == slow["id"] and x["status"] == "cancelled" for x in b), "cancelled")
    assert "cancelled by ada@web" in c.log(slow["id"])
    again = s.request(f"/builds/{slow['id']}/cancel", {"csrf": token})
    assert again.status == 409 and "already cancelled" in again.text
    gate.touch()

    made = s.request("/branches/main/trigger", {"csrf": _csrf(s, "/branches/main")})
    assert made.status == 303
    new = s.json("/api/" + made.headers["location"].lstrip("/"))["build"]
    assert new["reason"] == "manual" and new["branch"] == "main"


def test_actions_need_users_and_are_off_by_default(cluster, repo, tmp_path):
    from ci.web.auth import hash_password
    config = tmp_path / "web.yaml"
    config.write_text("web: {actions: true}\n")
    done = tinyci("web", "--port", "0", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2 and "web.actions needs web.users" in done.stderr
    c = cluster(extra={"web": {"users": {"ada": hash_password("s3cret")}}})
    c.dispatcher()
    _, s = start_web(c)
    _login(s)
    assert s.request("/branches/main/trigger", {"csrf": _csrf(s, "/")}).status == 404
    assert "/trigger" not in s.ok("/branches/main").text


def test_every_page_renders_before_anything_happened(cluster):
    c = cluster()
    c.dispatcher()
    _, s = start_web(c)
    for path in ("/", "/builds", "/runners", "/branches/main", "/api/builds", "/api/runners", "/api/queue",
                 "/badge/main.svg", "/metrics", "/builds?status=failed&before=5"):
        assert s.get(path).status == 200, path
    assert "No runner has registered yet" in s.ok("/").text
    assert s.get("/commits/abc").status == 404 and s.get("/builds/1").status == 404
    assert s.get("/login").status == 404                 # no users: nothing to log in to


def test_sigterm_stops_the_web_at_once_with_pages_following(site):
    c, s, repo = site
    web = next(d for d in c.daemons if d.kind == "web")
    url = urlsplit(s.base)
    held = []
    for path in ("/events", "/builds/1/log/live?offset=0&line=1"):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.request("GET", path)
        assert conn.getresponse().status == 200
        held.append(conn)
    started = time.monotonic()
    assert web.stop(timeout=8) == 0
    assert time.monotonic() - started < 4.0
    for conn in held:
        conn.close()
