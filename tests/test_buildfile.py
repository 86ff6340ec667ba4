""".ci.yaml parsing, the artifact store's path checks and the log cap, without daemons."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ci import buildfile, patterns
from ci.artifacts import ArtifactError, Artifacts
from ci.buildfile import BuildFileError, Step
from ci.buildlogs import LogCap
from ci.models import pipeline_status
from ci.store import Store

SHA = "a" * 40


def test_full_schema_parses():
    spec = buildfile.parse(
        "timeout: 300\n"
        "env: {MODE: fast, LEVEL: 2}\n"
        "artifacts: [dist/*.whl, report.xml]\n"
        "steps:\n"
        "  - make\n"
        "  - name: unit tests\n"
        "    run: pytest -q\n"
        "    timeout: 60\n"
        "    env: {VERBOSE: true}\n"
        "jobs:\n"
        "  linux: {labels: [linux]}\n"
        "  arm:\n"
        "    labels: [linux, arm64]\n"
        "    steps: [make cross]\n"
        "    env: {MODE: slow}\n")
    assert spec.timeout == 300 and spec.artifacts == ("dist/*.whl", "report.xml")
    assert spec.job_list() == [{"name": "linux", "labels": ["linux"]},
                               {"name": "arm", "labels": ["linux", "arm64"]}]
    steps, timeout, env = spec.plan("linux")
    assert steps == (Step("make"), Step("pytest -q", "unit tests", 60.0, {"VERBOSE": "true"}))
    assert (timeout, env) == (300.0, {"MODE": "fast", "LEVEL": "2"})
    steps, _, env = spec.plan("arm")
    assert steps == (Step("make cross"),) and env["MODE"] == "slow"
    with pytest.raises(BuildFileError, match="no job 'mips'"):
        spec.plan("mips")


def test_without_jobs_one_default_job():
    spec = buildfile.parse("steps: [echo hi]\n")
    assert spec.job_list() == [{"name": "", "labels": []}]
    assert spec.plan("")[0] == (Step("echo hi"),)


@pytest.mark.parametrize("text, line, words", [
    ("steps: [make\n", 2, "not valid YAML"),
    ("steps:\n  - make\n  - run: 3\n", 3, "steps[2].run must be a non-empty string"),
    ("steps: [make]\ntimout: 5\n", 2, "unknown key 'timout'"),
    ("steps: [make]\ntimeout: -1\n", 2, "positive number of seconds, at most 604800 (a week), got -1"),
    ("steps:\n  - make\n  - {name: x}\n", 3, "needs 'run'"),
    ("env: {A: 1}\n", 1, "needs 'steps'"),
    ("steps: [make]\njobs:\n  a:\n    labels: [has space]\n", 4, "'has space'"),
    ("jobs:\n  a: {labels: [x]}\n", 2, "jobs.a has no steps"),
    ("steps: [make]\nartifacts: [../secrets]\n", 2, "inside the checkout"),
    ("steps: [a]\nsteps: [b]\n", 2, "appears twice"),
    ("- make\n", 1, "top level must be a mapping"),
    ("steps: [make]\ntimeout: .inf\n", 2, "at most 604800"),
    ("steps: [make]\ntimeout: 1e308\n", 2, "at most 604800"),
    ("steps:\n  - {run: make, timeout: .inf}\n", 2, "at most 604800"),
    ("steps: [make]\njobs:\n" + "".join(f"  j{i}: {{}}\n" for i in range(101)), 3,
     "101 jobs, more than the 100"),
    # matrix, needs, when
    ("steps: [make]\njobs:\n  a:\n    matrix: {x: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n  b:\n    matrix:\n"
     "      y: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n      z: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n", 6,
     "jobs.b: its matrix takes the commit to 110 builds, more than the 100"),
    ("steps: [make]\njobs:\n  a:\n    matrix: {x: [1, 1]}\n", 4, "matrix.x: '1' appears twice"),
    ("steps: [make]\njobs:\n  a:\n    matrix: {x: [has space]}\n", 4, "1-50 letters"),
    ("steps: [make]\njobs:\n  a:\n    matrix: {1x: [a]}\n", 4, "axis '1x'"),
    ("steps: [make]\njobs:\n  a:\n    matrix: {x: []}\n", 4, "non-empty list"),
    ("steps: [make]\njobs:\n  a:\n    matrix: {x: [a]}\n    labels: ['${{ matrix.y }}']\n", 5,
     "names matrix.y, but the job's matrix has axes x"),
    ("steps: [make]\njobs:\n  a:\n    needs: [a2]\n  b: {}\n", 4, "jobs.a.needs: there is no job 'a2' (jobs: a, b)"),
    ("steps: [make]\njobs:\n  a:\n    needs: [c]\n  b:\n    needs: [a]\n  c:\n    needs: [b]\n", 4,
     "jobs.a.needs: a cycle: a -> c -> b -> a"),
    ("steps: [make]\njobs:\n  a: {needs: [a]}\n", 3, "a cycle: a -> a"),
    ("steps: [make]\njobs:\n  a:\n    when: {branch: [main]}\n", 4, "unknown key 'branch' (known: branches, paths)"),
    ("steps: [make]\njobs:\n  a:\n    when: {paths: []}\n", 4, "when.paths must be a non-empty list"),
])
def test_broken_files_name_the_line(text, line, words):
    with pytest.raises(BuildFileError) as err:
        buildfile.parse(text)
    assert err.value.line == line
    assert words in str(err.value) and str(err.value).startswith(f".ci.yaml line {line}:")


def test_pipeline_rule():
    assert pipeline_status(["passed", "error", "failed"]) == "error"
    assert pipeline_status(["passed", "failed", "running"]) == "failed"
    assert pipeline_status(["passed", "passed"]) == "passed"
    assert pipeline_status(["passed", "queued"]) == "running"
    assert pipeline_status(["skipped"]) == "skipped"


# ---------------------------------------------------------------- artifact paths

@pytest.fixture
def arts(tmp_path):
    store = Store(tmp_path / "data")
    yield Artifacts(store)
    store.close()


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "a//b", "./a", "a\\..\\b", "", "a/"])
def test_escaping_artifact_paths_are_refused(arts, tmp_path, path):
    with pytest.raises(ArtifactError) as err:
        arts.write(1, SHA, path, 0, b"x", True, 1 << 20)
    assert err.value.code == "bad_path"
    assert not (tmp_path / "escape").exists() and arts.list(1) == []


def test_a_finished_artifact_and_every_directory_naming_it_are_on_the_disk_before_it_is_listed(
        arts, tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):        # the real fsync, and what it synced
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    arts.write(1, SHA, "out/deep/report.txt", 0, b"half ", False, 1 << 20)
    assert synced == [] and arts.list(1) == []
    arts.write(1, SHA, "out/deep/report.txt", 5, b"done", True, 1 << 20)
    root = tmp_path / "data" / "artifacts"
    build = root / SHA / "1"
    assert synced[0] == str(build / "out/deep/report.txt")
    assert sorted(synced[1:]) == sorted(map(str, [build / "out/deep", build / "out", build, root / SHA, root,
                                                  tmp_path / "data"]))
    assert [a["path"] for a in arts.list(1)] == ["out/deep/report.txt"]
    synced.clear()          # the next file in a directory that exists: its own name only
    arts.write(1, SHA, "out/deep/other.txt", 0, b"x", True, 1 << 20)
    assert synced == [str(build / "out/deep/other.txt"), str(build / "out/deep")]


def test_a_symlink_in_the_store_is_never_followed(arts, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    base = arts.directory(1, SHA)
    base.mkdir(parents=True)
    os.symlink(outside, base / "dir")
    os.symlink(outside / "file", base / "file")
    for path in ("dir/x", "file"):
        with pytest.raises(ArtifactError):
            arts.write(1, SHA, path, 0, b"x", True, 1 << 20)
    assert list(outside.iterdir()) == []


def test_artifacts_are_written_listed_and_capped(arts):
    arts.write(1, SHA, "out/a.txt", 0, b"hello ", False, 100)
    assert arts.list(1) == []                           # not listed until its last chunk
    arts.write(1, SHA, "out/a.txt", 6, b"world", True, 100)
    assert arts.list(1) == [{"path": "out/a.txt", "size": 11}]
    assert arts.read(1, SHA, "out/a.txt", 0, 1000) == (b"hello world", 11)
    assert (arts.directory(1, SHA) / "out" / "a.txt").read_bytes() == b"hello world"
    with pytest.raises(ArtifactError) as err:
        arts.write(1, SHA, "big", 0, b"x" * 90, True, 100)
    assert err.value.code == "too_large"


def test_a_retried_upload_waits_for_the_last_chunk_in_flight_and_only_the_retry_is_listed(arts):
    import asyncio

    async def race():
        first = b"a" * (8 << 20)
        await arts.write_off_loop(1, SHA, "big.bin", 0, first, False, 1 << 30)
        # the old connection's last chunk is still being written (and synced) when the runner,
        # which gave up waiting for its answer, starts the file again on a new connection
        old_last = asyncio.ensure_future(arts.write_off_loop(1, SHA, "big.bin", len(first), b"b" * (8 << 20),
                                                             True, 1 << 30))
        await asyncio.sleep(0)
        retry = await arts.write_off_loop(1, SHA, "big.bin", 0, b"retried", True, 1 << 30)
        with pytest.raises(ArtifactError) as err:
            await old_last
        return retry, err.value.code

    assert asyncio.run(race()) == (7, "stale")
    assert arts.list(1) == [{"path": "big.bin", "size": 7}]
    assert (arts.directory(1, SHA) / "big.bin").read_bytes() == b"retried"


def test_each_chunk_is_written_whole_in_pieces_and_its_bytes_handed_back_only_once_written(arts, monkeypatch):
    """A chunk bigger than a write's piece lands whole at its offset, in writes
    of at most WRITE_PIECE, whether written in line or behind the next (a
    middle chunk); ``written_out`` comes once per chunk, after its write
    returned (the buffer it frees is wiped at once here, as reuse would), and
    not for a write cancelled while its thread may still read the bytes."""
    import asyncio
    from ci import artifacts

    sizes: list[int] = []
    pwrite = os.pwrite

    def counted(fd, data, offset):
        sizes.append(len(data))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counted)
    chunks = [bytearray(os.urandom(3 * artifacts.WRITE_PIECE + 5)) for _ in range(3)]
    want = b"".join(chunks)
    handed: list[int] = []

    def written_out(n: int) -> None:
        handed.append(n)
        chunks[n][:] = bytes(len(chunks[n]))       # what the next frame's receive would do to it

    async def upload():
        offset = 0
        for n, chunk in enumerate(chunks):
            eof = n == len(chunks) - 1
            size = await arts.write_off_loop(1, SHA, "f.bin", offset, memoryview(chunk), eof, 1 << 30, 1,
                                             lambda n=n: written_out(n))
            # a middle chunk answers with where it starts, written behind the next
            assert size == (offset + len(chunk) if n == 0 or eof else offset)
            offset += len(chunk)
        # a write whose task is cancelled hands nothing back: its thread may read on
        future = artifacts._quiet(asyncio.ensure_future(asyncio.sleep(10)), lambda: handed.append(-1))
        future.cancel()
        await asyncio.sleep(0.01)

    asyncio.run(upload())
    assert (arts.directory(1, SHA) / "f.bin").read_bytes() == want
    assert sorted(handed) == [0, 1, 2]
    assert max(sizes) == artifacts.WRITE_PIECE and sum(sizes) == len(want)
    assert arts.list(1) == [{"path": "f.bin", "size": len(want)}]


# ---------------------------------------------------------------- log cap

def test_log_cap_keeps_head_and_tail_and_exact_offsets(tmp_path):
    cap = LogCap(tmp_path, 1000)
    lines = [f"line {n:05d}\n".encode() for n in range(1000)]      # 11 bytes each
    sent = 0
    for line in lines:
        sent += len(line)
        assert cap.append(7, line, 0) == sent                      # the runner's offsets stay right
    cap.append(7, b"x" * 5000, 0)                                  # a chunk bigger than the cap
    cap.close(7)
    text = (tmp_path / "7.log").read_text()
    assert text.startswith("line 00000\n") and text.endswith("x" * 100)
    (tmp_path / "7.log").unlink()
    sent = 0
    for line in lines:
        sent += len(line)
        cap.append(7, line, 0)
    cap.close(7)
    text = (tmp_path / "7.log").read_text()
    assert text.startswith("line 00000\n") and text.endswith("line 00999\n")
    assert "bytes cut here" in text and "line 00500" not in text
    assert len(text) < 1200
    head, rest = text.split("\n[... ", 1)
    cut, tail = int(rest.split(" bytes")[0]), rest.split("...]\n", 1)[1]
    assert len(head) + cut + len(tail) == sent                     # says exactly how much is missing


def alias_bomb(jobs: int, steps: int, keys: int) -> str:
    """A small file whose aliases fan out: every job names the same steps, every
    step the same env (jobs -> *steps -> *step -> *env)."""
    env = "env: &e {" + ", ".join(f"K{i}: v" for i in range(keys)) + "}\n"
    shared = "steps: &ss [&s {run: 'true', env: *e}" + ", *s" * (steps - 1) + "]\n"
    return env + shared + "jobs:\n" + "".join(f"  j{i}: {{steps: *ss, env: *e}}\n" for i in range(jobs))


def test_aliases_that_fan_out_are_refused_not_followed():
    text = alias_bomb(jobs=100, steps=200, keys=100)
    assert len(text) < 10_000            # a few KB that would expand to two million values
    with pytest.raises(BuildFileError) as err:
        buildfile.parse(text)
    assert "more than 50000 values once its aliases" in str(err.value)


def test_a_few_aliases_are_fine():
    spec = buildfile.parse(alias_bomb(jobs=3, steps=2, keys=2))
    steps, _, env = spec.plan("j1")
    assert len(steps) == 2 and steps[0].env == {"K0": "v", "K1": "v"} and env == {"K0": "v", "K1": "v"}


def test_deep_nesting_is_an_error_not_a_crash():
    for text in ("steps: " + "[" * 5000 + "]" * 5000, "steps: " + "{a: " * 5000 + "1" + "}" * 5000):
        with pytest.raises(BuildFileError) as err:
            buildfile.parse(text)
        assert "nest" in str(err.value)


GRAPH = """\
steps: [make]
env: {MATRIX_PYTHON: top}
jobs:
  test:
    matrix: {python: ["3.10", "3.11"], os: [linux, bsd]}
    labels: ["py${{ matrix.python }}", "${{matrix.os}}", fast]
    env: {X: "1"}
  lint:
    needs: [test]
    when: {branches: [main, "release/*"], paths: ["src/*", "*.py"]}
"""


def test_a_matrix_expands_into_one_build_per_combination():
    spec = buildfile.parse(GRAPH)
    jobs = spec.job_list()
    names = [j["name"] for j in jobs]
    assert names == ["test (python=3.10, os=linux)", "test (python=3.10, os=bsd)",
                     "test (python=3.11, os=linux)", "test (python=3.11, os=bsd)", "lint"]
    assert jobs[3]["labels"] == ["py3.11", "bsd", "fast"]
    # lint needs every combination of test; the runner finds each build's steps by its name
    assert jobs[4]["needs"] == names[:4] and "needs" not in jobs[0]
    steps, _, env = spec.plan("test (python=3.11, os=bsd)")
    assert steps == (Step("make"),) and env == {"MATRIX_PYTHON": "3.11", "MATRIX_OS": "bsd", "X": "1"}
    with pytest.raises(BuildFileError, match="there is no job 'test'"):
        spec.plan("test")           # a matrix job is only its combinations
    assert all(patterns.is_job(n) for n in names)


def test_when_names_why_a_job_does_not_run():
    spec = buildfile.parse(GRAPH)

    def skip(branch, changed):
        return {j["name"]: j.get("skip", "") for j in spec.job_list(branch, changed)}["lint"]

    assert skip("main", ("src/a.py",)) == ""
    assert skip("release/2.0", ("docs/x.md", "setup.py")) == ""           # '*' crosses '/'
    assert skip("feature", ("src/a.py",)) == "branch feature is not among when.branches (main, release/*)"
    assert skip("main", ("docs/x.md",)) == "no changed path matches when.paths (src/*, *.py)"
    assert skip("main", None) == "" and skip(None, ("docs/x.md",)) != ""   # unknown: that rule does not skip
    assert spec.uses_paths() and not buildfile.parse("steps: [make]\njobs: {a: {}}\n").uses_paths()


def test_secrets_a_job_asks_for_go_with_its_job_and_top_level_ones_with_every_job():
    spec = buildfile.parse("secrets: [SHARED]\nsteps: [make]\njobs:\n  test: {}\n"
                           "  publish: {secrets: [PYPI_TOKEN, SHARED, PYPI_TOKEN]}\n")
    assert spec.job_list() == [{"name": "test", "labels": [], "secrets": ["SHARED"]},
                               {"name": "publish", "labels": [], "secrets": ["SHARED", "PYPI_TOKEN"]}]
    assert buildfile.parse("steps: [make]\nsecrets: [TOKEN]\n").job_list() == [
        {"name": "", "labels": [], "secrets": ["TOKEN"]}]
    assert buildfile.parse("steps: [make]\n").job_list() == [{"name": "", "labels": []}]
    for text, words in (("steps: [make]\njobs: {a: {secrets: [bad-name]}}\n", "jobs.a.secrets: 'bad-name'"),
                        ("steps: [make]\nsecrets: TOKEN\n", "secrets must be a list of secret names"),
                        ("steps: [make]\nsecrets: []\n", "secrets must be a list of secret names")):
        with pytest.raises(BuildFileError) as err:
            buildfile.parse(text)
        assert words in str(err.value) and "line " in str(err.value)


def test_cache_reports_and_job_artifacts_replace_the_top_levels_for_a_job():
    from ci.buildfile import CacheSpec
    f = buildfile.parse("artifacts: [dist/*]\n"
              "cache: {paths: [.venv, ~/.cache/pip], key: [requirements*.txt]}\n"
              "reports: [junit.xml]\n"
              "jobs:\n"
              "  test: {steps: [pytest], reports: [test-*.xml], cache: {paths: [.tox]}}\n"
              "  build: {steps: [make], artifacts: [out/*.whl]}\n"
              "  docs: {steps: [make docs]}\n")
    test, build, docs = f.what_to_keep("test"), f.what_to_keep("build"), f.what_to_keep("docs")
    assert test.reports == ("test-*.xml",) and test.cache == CacheSpec((".tox",), ())
    assert test.artifacts == ("dist/*",) and not test.artifacts_own
    assert build.artifacts == ("out/*.whl",) and build.artifacts_own and build.reports == ("junit.xml",)
    assert docs.cache == CacheSpec((".venv", "~/.cache/pip"), ("requirements*.txt",))
    single = buildfile.parse("artifacts: [x]\nsteps: [make]\n").what_to_keep("")
    assert single.artifacts == ("x",) and single.artifacts_own and single.cache is None


def test_bad_cache_and_reports_name_their_line():
    cases = {
        "steps: [x]\ncache: [.venv]\n": "line 2: cache must be a mapping",
        "steps: [x]\ncache: {paths: []}\n": "line 2: cache.paths must be a non-empty list",
        "steps: [x]\ncache:\n  paths: [.venv, ../up]\n": "line 3: cache.paths: '../up' must be a path inside",
        "steps: [x]\ncache: {paths: [.git/x]}\n": "must be a path inside",
        "steps: [x]\ncache: {paths: [a], key: [/etc/passwd]}\n": "cache.key: '/etc/passwd' must stay inside",
        "steps: [x]\ncache: {paths: [a], when: x}\n": "cache: unknown key 'when'",
        "steps: [x]\nreports: junit.xml\n": "line 2: reports must be a list of glob patterns",
        "jobs:\n  a:\n    steps: [x]\n    reports: [../r.xml]\n": "line 4: jobs.a.reports: '../r.xml' must stay inside",
        "jobs:\n  a:\n    steps: [x]\n    artifacts: {a: 1}\n": "line 4: jobs.a.artifacts must be a list",
    }
    for text, expected in cases.items():
        with pytest.raises(BuildFileError) as caught:
            buildfile.parse(text)
        assert expected in str(caught.value), (text, str(caught.value))


def test_the_readmes_ci_yaml_examples_are_valid_and_use_every_key():
    # the README documents every key with a complete example: it must parse, and name them all
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### `.ci.yaml`", 1)[1].split("### Skipping", 1)[0]
    examples = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(examples) >= 2
    for text in examples:
        buildfile.parse(text)
    used = set(re.findall(r"^\s*(?:-\s*)?([a-z_]+):", "\n".join(examples), re.M))
    used |= set(re.findall(r"[{,]\s*([a-z_]+):", "\n".join(examples)))
    keys = set(buildfile.TOP_KEYS) | set(buildfile.JOB_KEYS) | set(buildfile.STEP_KEYS) | set(buildfile.WHEN_KEYS) \
        | set(buildfile.CACHE_KEYS)
    assert keys <= used, keys - used
