"""Test reports: the JUnit XML files a build's ``reports`` globs select, read
on the runner after the steps (passed or failed) into the counts and the
failed tests' names the dispatcher keeps (``result.tests``).

The XML comes from the build, so it is untrusted: it is parsed with
defusedxml with DTDs refused outright (no entity expansion, no external
entities: a "billion laughs" file is refused, not expanded), and what is
read is capped: MAX_FILES files of at most MAX_FILE_BYTES each, MAX_NAMES
failed tests' names of at most MAX_NAME characters.
"""

from __future__ import annotations

from pathlib import Path

from . import masking

MAX_FILES = 50
MAX_FILE_BYTES = 20 << 20
MAX_NAMES = 100
MAX_NAME = 300
COUNTS = ("passed", "failed", "errors", "skipped")


def empty() -> dict:
    return {**{name: 0 for name in COUNTS}, "failures": []}


def find(root: Path, patterns: tuple) -> tuple[list[Path], list[str]]:
    """The regular files (no symlinks, not in .git) inside ``root`` the globs match, at most MAX_FILES."""
    root = root.resolve()
    chosen: dict[str, Path] = {}
    notes = []
    for pattern in patterns:
        matched = False
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if rel.split("/")[0] == ".git" or rel in chosen:
                continue
            matched = True
            if path.is_symlink() or any(p.is_symlink() for p in path.parents if root in p.parents):
                notes.append(f"{rel}: a symlink (or inside one); not read")
            elif path.is_file():
                if len(chosen) >= MAX_FILES:
                    notes.append(f"{rel}: more than {MAX_FILES} report files; not read")
                    continue
                chosen[rel] = path
        if not matched:
            notes.append(f"{pattern}: matched nothing")
    return list(chosen.values()), notes


def add_file(report: dict, path: Path) -> None:
    """Count one JUnit XML file's test cases into ``report``. Raises ValueError naming what is wrong."""
    # the XML parser only where a report is read: `tinyci status` imports this module for ``summary`` (~7 ms)
    from xml.etree.ElementTree import ParseError

    import defusedxml.ElementTree as safe_xml
    from defusedxml import DefusedXmlException

    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{size} bytes, more than {MAX_FILE_BYTES}")
    try:
        root = safe_xml.parse(str(path), forbid_dtd=True, forbid_entities=True,
                              forbid_external=True).getroot()
    except DefusedXmlException as exc:
        raise ValueError(f"refused: {type(exc).__name__} (DTDs and entities are not read)") from None
    except ParseError as exc:
        raise ValueError(f"not well-formed XML: {exc}") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise ValueError(f"not a JUnit report (its root is <{root.tag[:50]}>)")
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            outcome = "failed"
        elif "error" in kinds:
            outcome = "errors"
        elif "skipped" in kinds:
            outcome = "skipped"
        else:
            outcome = "passed"
        report[outcome] += 1
        if outcome in ("failed", "errors") and len(report["failures"]) < MAX_NAMES:
            report["failures"].append(test_name(case.get("classname", ""), case.get("name", "")))


def test_name(classname: str, name: str) -> str:
    full = f"{classname}.{name}" if classname and name else (name or classname or "(unnamed)")
    return full if len(full) <= MAX_NAME else full[:MAX_NAME - 1] + "…"


def read(root: Path, patterns: tuple) -> tuple[dict | None, list[str]]:
    """The build's report (None when no file was read) and notes for the log. Blocking."""
    paths, notes = find(root, patterns)
    report, read_any = empty(), False
    for path in paths:
        rel = path.relative_to(root.resolve()).as_posix()
        try:
            add_file(report, path)
            read_any = True
        except (OSError, ValueError) as exc:
            notes.append(f"{rel}: {exc}; not counted")
    return (report if read_any else None), notes


def masked(tests: dict, secrets) -> dict:
    """``tests`` with every secret value in the failed tests' names hidden (``*`` per byte)."""
    values = list(secrets)
    return {**tests, "failures": [masking.hide(name.encode(), values).decode("utf-8", "replace")
                                  for name in tests["failures"]]}


def summary(tests: dict) -> str:
    """"1991 passed, 2 failed" (the counts that are not 0; "no tests" when all are)."""
    parts = [f"{tests.get(name, 0)} {name if name != 'errors' else 'error' + ('s' if tests.get(name) != 1 else '')}"
             for name in COUNTS if tests.get(name)]
    return ", ".join(parts) or "no tests"
