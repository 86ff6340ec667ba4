"""The web page in a real browser: the system's Chromium driven by Playwright,
against real daemons and a real `tinyci web` process.

A commit's build appears on `/` and turns passed without a reload; a
running build's log grows on its page; the history filters; an artifact
downloads; the badge draws; a hostile commit subject stays text and runs
nothing. The screenshots in docs/ come from here too (``test_screenshots``,
with TINYCI_SCREENSHOTS=docs).

No browser is not a reason to pass: without Chromium (or Playwright) these
tests fail and say what to install. Playwright's own browser download is not
used; it launches the system's ``chromium`` with a fresh profile.
"""

from __future__ import annotations

import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, Cluster, Repo, finished
from web_site import start_site, start_web

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_SCRIPT = "<script>window.pwned=1</script>"
WAIT_MS = 30_000


def chromium() -> str:
    found = os.environ.get("TINYCI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no Chromium to run the web page's browser tests: install it (Debian: apt-get install "
                    "chromium; .ci/run does) or set TINYCI_CHROMIUM to its path", pytrace=False)
    return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium for the module, with a fresh profile; a new page per test."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is not installed: pip install '.[test]'", pytrace=False)
    executable = chromium()
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=executable, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 860}, accept_downloads=True)
        context.set_default_timeout(WAIT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.dialogs = []                   # every alert/confirm a page tries to open
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    yield page
    page.close()


@pytest.fixture
def site(cluster, repo):
    c, s = start_site(cluster, repo)
    builds(c, lambda b: b and finished(b), "the first build")
    return c, s, repo


def off_loop(fn, *args, **kwargs):
    """Call ``fn`` in a thread of its own: Playwright's sync API keeps an event
    loop running in this one, and the cluster's requests use asyncio.run."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def builds(c: Cluster, predicate, what: str, timeout: float = 60.0) -> list[dict]:
    return off_loop(c.wait_builds, predicate, what, timeout)


def mark(page) -> None:
    """Something a reload would wipe out."""
    page.evaluate("window.notReloaded = 1")


def still_marked(page) -> bool:
    return page.evaluate("window.notReloaded") == 1


# ---------------------------------------------------------------- live

def test_a_commit_appears_and_turns_passed_without_a_reload(site, page, tmp_path):
    c, s, repo = site
    gate = tmp_path / "go"
    page.goto(s.base + "/")
    page.wait_for_selector("#conn.up")
    mark(page)
    repo.commit("Teach the parser commas", {"build.sh": f"while [ ! -e {gate} ]; do sleep 0.05; done\n"})
    item = page.locator("li.commit", has_text="Teach the parser commas")
    item.locator(".chip.st-running").wait_for()
    assert page.locator("#runners").get_by_text("busy").count() == 1
    gate.touch()
    item.locator(".chip.st-passed").wait_for()
    page.locator("#runners tr.runner-idle").wait_for()
    assert still_marked(page)
    assert page.locator(".stat.ok b").inner_text() == "2"            # passed in the last hour


def test_a_running_builds_log_grows_and_its_status_follows(site, page, tmp_path):
    c, s, repo = site
    gate = tmp_path / "go"
    repo.commit("slow one", {"build.sh": f"echo first line; while [ ! -e {gate} ]; do sleep 0.05; done; "
                                         f"printf '\\033[32msecond line\\033[0m\\n'; echo third line\n"})
    build = builds(c, lambda b: b[0]["status"] == "running" and "first line" in c.log(b[0]["id"]),
                   "the build running")[0]
    page.goto(f"{s.base}/builds/{build['id']}")
    page.locator("#log").get_by_text("first line").wait_for()
    page.locator("#follow-state", has_text="following").wait_for()
    assert page.locator("#head h1 .st").inner_text() == "running"
    mark(page)
    gate.touch()
    page.locator("#log .f2", has_text="second line").wait_for()
    page.locator("#log").get_by_text("third line").wait_for()
    page.locator("#head h1 .st-passed").wait_for()
    assert still_marked(page)
    numbers = page.locator("#log .ln").evaluate_all("lines => lines.map(l => l.id)")
    assert numbers == [f"L{n}" for n in range(1, len(numbers) + 1)]     # no line twice, none missing
    assert page.locator("#log").inner_text().count("first line") == 1
    third = next(n for n in range(1, len(numbers) + 1)
                 if page.locator(f"#L{n}").inner_text().endswith("third line"))
    page.goto(f"{s.base}/builds/{build['id']}#L{third}")                 # a line is linkable
    assert page.evaluate("getComputedStyle(document.querySelector(':target')).backgroundColor") not in \
        ("rgba(0, 0, 0, 0)", "transparent")


# ---------------------------------------------------------------- history, artifacts, badge

def test_the_history_filters(site, page):
    c, s, repo = site
    repo.commit("main work", {"build.sh": "exit 0\n"})
    builds(c, lambda b: len(b) == 2, "main's build (before dev shows the same commit)")
    repo.git("checkout", "-q", "-b", "dev")
    repo.commit("dev breaks", {"build.sh": "exit 1\n"})
    builds(c, lambda b: len(b) == 3 and finished(b), "three builds")
    page.goto(s.base + "/builds")
    assert page.locator("table.builds tbody tr").count() == 3
    page.fill("input[name=branch]", "dev")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/builds?branch=dev*")
    rows = page.locator("table.builds tbody tr")
    assert rows.count() == 1 and "dev breaks" in rows.inner_text()
    page.fill("input[name=branch]", "")
    page.select_option("select[name=status]", "passed")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/builds?status=passed*")
    assert page.locator("table.builds tbody tr").count() == 2
    assert page.locator("table.builds .st-failed").count() == 0
    page.click("text=clear")
    assert page.locator("table.builds tbody tr").count() == 3


def test_an_artifact_downloads_and_the_badge_draws(site, page, tmp_path):
    c, s, repo = site
    sha = repo.commit("ship it", {".ci.yaml": "artifacts: [dist/*]\nsteps:\n  - mkdir -p dist && "
                                              "printf 'wheel bytes' > dist/app-1.0.whl\n"})
    build = next(b for b in builds(c, lambda b: len(b) == 2 and finished(b), "the build") if b["sha"] == sha)
    page.goto(f"{s.base}/builds/{build['id']}")
    with page.expect_download() as got:
        page.click("ul.artifacts a")
    download = got.value
    assert download.suggested_filename == "app-1.0.whl"
    target = tmp_path / "got.whl"
    download.save_as(target)
    assert target.read_bytes() == b"wheel bytes"
    page.goto(s.base + "/branches/main")
    badge = page.locator("#badge img")
    badge.wait_for()
    page.wait_for_function("document.querySelector('#badge img').naturalWidth > 0")
    assert badge.get_attribute("alt") == "build: passed"
    page.goto(s.base + "/badge/main.svg")
    assert "passing" in page.locator("svg").text_content()


# ---------------------------------------------------------------- hostile text

def test_a_hostile_subject_is_text_on_every_page_and_runs_nothing(site, page):
    c, s, repo = site
    page.goto(s.base + "/")                  # open before the commit: the subject arrives by a live update
    page.wait_for_selector("#conn.up")
    sha = repo.commit(f"{HOSTILE} {HOSTILE_SCRIPT}", {"build.sh": f"echo '{HOSTILE}'\n"})
    page.locator("li.commit", has_text=HOSTILE).wait_for()
    build = next(b for b in builds(c, lambda b: len(b) == 2 and finished(b), "the build") if b["sha"] == sha)
    for path in ("/", "/builds", f"/builds/{build['id']}", f"/commits/{sha}", "/branches/main"):
        page.goto(s.base + path)
        assert page.get_by_text(HOSTILE).count() >= 1, path            # shown as the text it is
        assert page.locator("img[src=x]").count() == 0, path
        assert page.evaluate("window.pwned") is None, path
    page.goto(f"{s.base}/builds/{build['id']}")
    assert page.locator("#log code").get_by_text(HOSTILE, exact=True).count() == 1     # the log line too
    assert page.dialogs == []


# ---------------------------------------------------------------- screenshots for the README

SCREENSHOT_CI = """\
jobs:
  test: {}
  lint: {}
steps:
  - sh build.sh
"""


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_screenshots(cluster, tmp_path, browser):
    """The overview and a build page as a team sees them mid-afternoon: two
    runners busy, a build waiting, passes and a failure. Into
    $TINYCI_SCREENSHOTS (docs/ for the README) or a temp dir."""
    out = Path(os.environ.get("TINYCI_SCREENSHOTS") or tmp_path)
    if not out.is_absolute():
        out = ROOT / out
    repo = Repo(tmp_path / "repo")
    gate = tmp_path / "go"
    hold = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    colours = ("printf '\\033[1m=== test session starts ===\\033[0m\\n'; "
               "printf 'tests/test_calc.py \\033[32m....\\033[0m\\n'; "
               "printf 'tests/test_parse.py \\033[32m...\\033[0m\\033[31mF\\033[0m\\n'; ")
    c = cluster(steps=["sh build.sh"])
    c.dispatcher()
    c.runner("linux-1")
    c.runner("linux-2")
    c.observer(repo)
    _, s = start_web(c)
    commits = [("Add calc and its test", "echo ok"),
               ("Parse negative numbers", colours + "printf '\\033[31m1 failed\\033[0m, 7 passed\\n'; exit 1"),
               ("Fix the sign of -0 in the parser", colours.replace("\\033[31mF", "\\033[32m.")
                + "printf '\\033[32m8 passed\\033[0m in 0.41s\\n'"),
               ("Speed up tokenizing long lines", "echo collecting; " + hold)]
    repo.commit("Add calc and its test", {".ci.yaml": SCREENSHOT_CI, "build.sh": "echo ok\n"})
    builds(c, lambda b: len(b) == 2 and finished(b), "the first commit")
    for n, (subject, script) in enumerate(commits[1:], 2):
        repo.commit(subject, {"build.sh": script + "\n"})
        if n < len(commits):
            builds(c, lambda b, n=n: len(b) == 2 * n and finished(b), subject)
    builds(c, lambda b: sum(x["status"] == "running" for x in b) == 2, "two running")
    repo.commit("Document the grammar", {"build.sh": "echo docs\n", "GRAMMAR.md": "expr := term\n"})
    builds(c, lambda b: sum(x["status"] == "queued" for x in b) == 2, "two waiting")
    failed = next(b for b in off_loop(c.builds) if b["status"] == "failed")
    shots = {}
    try:
        for name, path, size, scheme in (
                ("web-overview.png", "/", (1280, 720), "light"),
                ("web-build.png", f"/builds/{failed['id']}", (1280, 720), "dark"),
                ("web-phone.png", "/", (390, 844), "light")):
            page = browser.new_page()
            page.set_viewport_size({"width": size[0], "height": size[1]})
            page.emulate_media(color_scheme=scheme)
            page.goto(s.base + path)
            page.wait_for_selector("#conn.up")
            page.screenshot(path=str(out / name))
            shots[name] = png_size(out / name)
            page.close()
    finally:
        gate.touch()
    assert shots == {"web-overview.png": (1280, 720), "web-build.png": (1280, 720), "web-phone.png": (390, 844)}
