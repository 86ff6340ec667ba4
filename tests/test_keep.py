"""What a build keeps, end to end with the real daemons and real git repositories:
the runner's cache (a hit on the next build restores the files; LRU eviction
at runner.cache_bytes), artifacts per job, and JUnit reports counted and shown
by `tinyci show`, `tinyci status` and the dispatcher's `build` reply."""

from __future__ import annotations

import json

from conftest import finished, tinyci

CACHED = """\
cache:
  paths: [deps, ~/.toolcache]
  key: [requirements*.txt]
steps:
  - if [ -f deps/made-by ]; then echo "deps restored from build $(cat deps/made-by)"; else mkdir -p deps && echo $CI_BUILD > deps/made-by && echo "deps made"; fi
  - mkdir -p ~/.toolcache && echo warm > ~/.toolcache/state
"""


def build_of(c, sha):
    builds = c.wait_builds(lambda b: finished([x for x in b if x["sha"] == sha]), f"the build of {sha[:8]}")
    return [b for b in builds if b["sha"] == sha][0]


def test_the_second_build_hits_the_cache_and_finds_its_files_and_a_new_key_misses(cluster, repo, tmp_path):
    c = cluster()
    home = tmp_path / "home"
    home.mkdir()
    c.env["HOME"] = str(home)           # the steps' ~ (the runner passes its own on)
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    first = build_of(c, repo.commit("cached", {".ci.yaml": CACHED, "requirements.txt": "click\n"}))
    log1 = c.log(first["id"])
    assert first["status"] == "passed", log1
    assert "cache: miss " in log1 and "deps made" in log1 and "cache: saved " in log1, log1
    key = log1.split("cache: miss ")[1].split()[0]

    (home / ".toolcache" / "state").unlink()
    second = build_of(c, repo.commit("unrelated change", {"README": "hello\n"}))
    log2 = c.log(second["id"])
    assert second["status"] == "passed", log2
    assert f"cache: hit {key} (2 path(s)" in log2, log2
    assert f"deps restored from build {first['id']}" in log2
    assert f"cache: {key} is already saved" in log2
    assert (home / ".toolcache" / "state").read_text() == "warm\n"

    third = build_of(c, repo.commit("new requirements", {"requirements.txt": "click\nrich\n"}))
    log3 = c.log(third["id"])
    assert "cache: miss " in log3 and key not in log3 and "deps made" in log3, log3


EVICTING = """\
cache:
  paths: [deps]
  key: [key.txt]
steps:
  - if [ -f deps/blob ]; then echo "restored $(cat key.txt)"; else mkdir -p deps && head -c $(cat size.txt) /dev/zero > deps/blob; fi
"""


def test_the_least_recently_used_entry_is_evicted_at_runner_cache_bytes_and_a_failed_build_saves_nothing(
        cluster, repo):
    c = cluster(extra={"runner": {"cache_bytes": 2500}})
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)

    def build(message, files):
        b = build_of(c, repo.commit(message, files))
        return b, c.log(b["id"])

    _, log = build("a", {".ci.yaml": EVICTING, "key.txt": "a", "size.txt": "1000"})
    assert "cache: saved" in log, log
    _, log = build("b", {"key.txt": "b"})
    assert "cache: saved" in log and "evicted" not in log, log
    _, log = build("a again", {"key.txt": "a"})
    assert "cache: hit" in log and "restored a" in log, log         # a is now the most recently used
    _, log = build("c", {"key.txt": "c"})
    assert "cache: saved" in log and "evicted 1 least recently used entry" in log, log
    _, log = build("b again", {"key.txt": "b"})
    assert "cache: miss" in log, log                                # b went, not a
    _, log = build("too big", {"key.txt": "d", "size.txt": "4000"})
    assert "cache: not saved: over runner.cache_bytes" in log, log
    failing, log = build("fails", {"key.txt": "e", "size.txt": "10", "build.sh": "exit 1\n",
                                   ".ci.yaml": EVICTING + "  - sh build.sh\n"})
    assert failing["status"] == "failed" and "cache: not saved: the build failed" in log, log


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
  <testcase classname="tests.test_a" name="test_ok"/>
  <testcase classname="tests.test_a" name="test_also_ok"/>
  <testcase classname="tests.test_a" name="test_broken"><failure message="assert 1 == 2">trace</failure></testcase>
  <testcase classname="tests.test_b" name="test_later"><skipped/></testcase>
</testsuite></testsuites>
"""

REPORTS = """\
jobs:
  test:
    steps: [cp junit.src junit.xml, exit 1]
    reports: [junit.xml, other/*.xml]
    artifacts: [junit.xml]
  package:
    steps: [mkdir -p dist && echo wheel > dist/pkg.whl]
    artifacts: [dist/*.whl]
"""


def test_junit_reports_are_counted_and_shown_and_each_job_has_its_own_artifacts(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    sha = repo.commit("reports", {".ci.yaml": REPORTS, "junit.src": JUNIT})
    builds = c.wait_builds(lambda b: len([x for x in b if x["sha"] == sha]) == 2
                           and finished([x for x in b if x["sha"] == sha]), "both jobs")
    test = next(b for b in builds if b["sha"] == sha and b["job"] == "test")
    package = next(b for b in builds if b["sha"] == sha and b["job"] == "package")
    log = c.log(test["id"])
    assert test["status"] == "failed", log          # read though the steps failed
    assert "tests: 2 passed, 1 failed, 1 skipped" in log and "other/*.xml: matched nothing" in log
    assert "matched nothing" not in c.log(package["id"])
    assert "[artifact dist/pkg.whl (6 bytes) sent]" in c.log(package["id"])
    assert "[artifact junit.xml" in log

    detail = c.request({"type": "build", "build": test["id"]})["build"]
    assert detail["tests"] == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1,
                               "failures": ["tests.test_a.test_broken"]}
    assert "tests" not in c.request({"type": "build", "build": package["id"]})["build"]
    shown = tinyci("show", str(test["id"]), "--dispatcher", c.disp.addr)
    assert shown.returncode == 0, shown.stderr
    assert "tests: 2 passed, 1 failed, 1 skipped" in shown.stdout
    assert "FAILED tests.test_a.test_broken" in shown.stdout
    missing = tinyci("show", "999", "--dispatcher", c.disp.addr)
    assert missing.returncode == 1 and "no build 999" in missing.stderr and len(missing.stderr.splitlines()) == 1
    status = tinyci("status", "--json", "--dispatcher", c.disp.addr)
    listed = {b["id"]: b for b in json.loads(status.stdout)["builds"]}
    assert listed[test["id"]]["tests"] == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1}
    table = tinyci("status", "--dispatcher", c.disp.addr, COLUMNS="200")
    assert "2 passed, 1 failed, 1 skipped" in table.stdout, table.stdout


def test_the_web_build_page_and_history_show_the_counts_and_the_failures(cluster, repo):
    from web_site import start_site
    c, s = start_site(cluster, repo)
    hostile = JUNIT.replace('name="test_broken"', 'name="test_&lt;img src=x onerror=alert(1)&gt;"')
    sha = repo.commit("reports", {".ci.yaml": "steps: [cp junit.src junit.xml, exit 1]\nreports: [junit.xml]\n",
                                  "junit.src": hostile})
    build = build_of(c, sha)
    page = s.ok(f"/builds/{build['id']}").text
    assert "2 passed, 1 failed, 1 skipped" in page
    assert "<code>tests.test_a.test_&lt;img src=x onerror=alert(1)&gt;</code>" in page      # text, not markup
    history = s.ok("/builds").text
    assert '<span class="tests bad">2 passed, 1 failed, 1 skipped</span>' in history
    assert s.json(f"/api/builds/{build['id']}")["build"]["tests"]["failures"] == [
        "tests.test_a.test_<img src=x onerror=alert(1)>"]


def test_a_watcher_gets_the_test_counts_with_the_finished_builds_event(cluster, repo):
    import asyncio
    import threading

    from ci import net
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    secret, tls = c.credentials("reader")
    seen: list[dict] = []
    watching = threading.Event()

    async def watch() -> None:
        client = net.Client(*net.parse_addr(c.disp.addr), "reader", secret, ssl=tls)
        try:
            async for frame in client.stream({"type": "watch"}):
                watching.set()
                build = frame.get("build") or {}
                if build.get("status") == "failed":
                    seen.append(build)
                    return
        finally:
            await client.close()

    thread = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(watch(), 90)), daemon=True)
    thread.start()
    assert watching.wait(30), "the watch began"
    c.observer(repo)
    repo.commit("reports", {".ci.yaml": "steps: [cp junit.src junit.xml, exit 1]\nreports: [junit.xml]\n",
                            "junit.src": JUNIT})
    thread.join(90)
    assert seen and seen[0]["tests"] == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1}, seen
