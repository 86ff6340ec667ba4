"""ci/reports.py: JUnit XML counted, hostile XML refused (never expanded), what is kept capped."""

from __future__ import annotations

import time

from ci import protocol, reports

CASES = """<testsuite>
<testcase classname="m" name="a"/>
<testcase classname="m" name="b"><failure/></testcase>
<testcase name="c"><error message="boom"/></testcase>
<testcase classname="m" name="d"><skipped/></testcase>
</testsuite>"""

LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<testsuite><testcase classname="&lol9;" name="x"/></testsuite>"""

EXTERNAL = """<?xml version="1.0"?>
<!DOCTYPE t [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<testsuite><testcase classname="&secret;" name="x"><failure/></testcase></testsuite>"""


def test_counts_and_failed_names(tmp_path):
    (tmp_path / "r.xml").write_text(CASES)
    report, notes = reports.read(tmp_path, ("r.xml", "none/*.xml"))
    assert report == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1, "failures": ["m.b", "c"]}
    assert notes == ["none/*.xml: matched nothing"]
    assert protocol.TESTS.check(report)
    assert reports.summary(report) == "1 passed, 1 failed, 1 error, 1 skipped"
    assert reports.summary(reports.empty()) == "no tests"


def test_a_billion_laughs_and_an_external_entity_are_refused_not_expanded(tmp_path):
    (tmp_path / "laughs.xml").write_text(LAUGHS)
    (tmp_path / "external.xml").write_text(EXTERNAL)
    (tmp_path / "good.xml").write_text(CASES)
    began = time.monotonic()
    report, notes = reports.read(tmp_path, ("*.xml",))
    assert time.monotonic() - began < 5      # a bound on a hang, not a timing figure
    assert report["passed"] == 1 and report["failures"] == ["m.b", "c"]     # only good.xml counted
    assert any(n.startswith("laughs.xml: refused: DTDForbidden") for n in notes), notes
    assert any(n.startswith("external.xml: refused") for n in notes), notes


def test_what_is_kept_is_capped_and_bad_files_are_named(tmp_path):
    long = "x" * 1000
    cases = "".join(f'<testcase classname="{long}" name="t{i}"><failure/></testcase>' for i in range(250))
    (tmp_path / "many.xml").write_text(f"<testsuites><testsuite>{cases}</testsuite></testsuites>")
    (tmp_path / "broken.xml").write_text("<testsuite><testcase")
    (tmp_path / "other.xml").write_text("<html/>")
    (tmp_path / "link.xml").symlink_to(tmp_path / "many.xml")
    report, notes = reports.read(tmp_path, ("*.xml",))
    assert report["failed"] == 250 and len(report["failures"]) == reports.MAX_NAMES
    assert all(len(name) == reports.MAX_NAME for name in report["failures"])
    assert protocol.TESTS.check(report)
    assert any(n.startswith("broken.xml: not well-formed XML") for n in notes)
    assert "other.xml: not a JUnit report (its root is <html>); not counted" in notes
    assert "link.xml: a symlink (or inside one); not read" in notes


def test_no_report_read_is_none(tmp_path):
    assert reports.read(tmp_path, ("*.xml",)) == (None, ["*.xml: matched nothing"])


def test_the_wire_refuses_a_report_past_its_caps():
    good = {"passed": 1, "failed": 1, "errors": 0, "skipped": 0, "failures": ["a"]}
    assert protocol.TESTS.check(good)
    assert not protocol.TESTS.check({**good, "failures": ["a"] * 101})
    assert not protocol.TESTS.check({**good, "failures": ["a" * 301]})
    assert not protocol.TESTS.check({**good, "extra": 1})
    assert not protocol.TESTS.check({**good, "failed": -1})


def test_the_builds_table_shows_the_counts_and_drops_them_first_when_narrow():
    from rich.console import Console

    from ci import tui
    build = {"id": 7, "branch": "main", "sha": "a" * 40, "subject": "fix", "status": "failed", "attempt": 1,
             "runner": "r1", "created_at": 100.0, "finished_at": 160.0, "duration": 50.0,
             "tests": {"passed": 1991, "failed": 2, "errors": 0, "skipped": 3}}
    plain_build = {**build, "id": 6, "status": "passed"}
    del plain_build["tests"]

    def text(width: int) -> str:
        console = Console(record=True, width=width, color_system="standard", force_terminal=True)
        console.print(tui.render_builds([build, plain_build], 200.0, width=width))
        return console.export_text(styles=True)
    wide = text(160)
    assert "\x1b[31m1991 passed, 2 failed, 3 skipped" in wide       # red: some failed
    assert "tests" in wide
    narrow = text(70)
    assert "1991 passed" not in narrow and "failed" in narrow       # the status stays


def test_a_store_keeps_a_builds_report_and_lists_only_the_counts(tmp_path):
    from ci.store import Store
    store = Store(tmp_path / "data")
    try:
        one, _ = store.add_build(repo="/r", branch="main", sha="a" * 40, now=1.0)
        two, _ = store.add_build(repo="/r", branch="main", sha="b" * 40, now=2.0)
        report = {"passed": 3, "failed": 1, "errors": 0, "skipped": 0, "failures": ["m.t"]}
        store.save_report(one.id, [{"command": "pytest", "exit_code": 1}], report)
        assert store.tests(one.id) == report and store.tests(two.id) is None
        assert store.steps(one.id) == [{"command": "pytest", "exit_code": 1}]
        assert store.test_counts([one.id, two.id]) == {one.id: {"passed": 3, "failed": 1, "errors": 0,
                                                                "skipped": 0}}
        store.save_report(one.id, None, None)       # a later attempt without a report
        assert store.tests(one.id) is None and store.steps(one.id) is None
    finally:
        store.close()


def test_a_secret_in_a_failed_tests_name_is_masked():
    tests = {"passed": 1, "failed": 1, "errors": 0, "skipped": 0,
             "failures": ["tests.test_x.test_upload[pypi-AgEI0123456789]", "tests.test_y.test_other"]}
    masked = reports.masked(tests, ["pypi-AgEI0123456789"])
    assert masked["failures"] == ["tests.test_x.test_upload[" + "*" * 19 + "]", "tests.test_y.test_other"]
    assert masked["failed"] == 1 and tests["failures"][0].endswith("0123456789]")     # a copy
