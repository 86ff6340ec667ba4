"""The bench's printed table says each figure so it can be read: a ratio far below 1 (Buildbot's
builds a second over tinyci's) is not printed as 0.0, and a target met or missed says so."""

from bench.__main__ import table
from bench.harness import Result


def row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if f"| {name} " in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_small_figures_keep_two_digits_and_large_ones_one_decimal():
    res = Result("peer")
    res.add("builds/s ratio", 0.0342, "x")
    res.add("start-up", 0.178, "s")
    res.add("idle CPU", 0.9957, "% of a core")
    res.add("dispatches/s", 1253.46, "/s", ">= 2000")
    res.add("poll overhead", 23.94, "ms", "< 30")
    res.add("zero", 0.0, "ms")
    res.add("missing", None, "/s")
    text = table([res])
    assert row(text, "builds/s ratio")[2] == "0.034 x"
    assert row(text, "start-up")[2] == "0.18 s"
    assert row(text, "idle CPU")[2] == "1.0 % of a core"
    assert row(text, "dispatches/s")[2:] == ["1,253.5 /s", ">= 2000 /s", "NO"]
    assert row(text, "poll overhead")[2:] == ["23.9 ms", "< 30 ms", "yes"]
    assert row(text, "zero")[2] == "0.0 ms"
    assert row(text, "missing")[2] == "-"
