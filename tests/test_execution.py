"""One build attempt, run directly (no daemon, no network) in a slot's clone
of a real git repository: where the steps come from, failing and timed-out
steps, a stop from outside, the step's exit seen before its output closes,
output left open by an escaped process, and artifacts."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from pathlib import Path

import pytest

from ci import procgroup
from ci.attempt import Outcome, RunRequest
from ci.buildlog import BuildLog
from ci.execution import DEFAULT_TEST_STEP, NO_STEPS, OUTPUT_DRAIN, Execution, build_env
from ci.models import Status

from conftest import Repo, pid_alive
from runner_support import read_pid, wait_until

KILL_GRACE = 0.3


@pytest.fixture
def project(tmp_path: Path) -> Repo:
    repo = Repo(tmp_path / "repo")
    repo.commit("first", {"README": "a project without tests\n"})
    return repo


class Slot:
    """Runs attempts one after another in one slot's clone, as a runner would."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.clone = tmp_path / "checkouts" / "0"
        self.uploaded: dict[str, bytes] = {}
        self.refuse: dict[str, str] = {}        # artifact -> why the "dispatcher" refuses it
        self.stored: dict[tuple, bytes] = {}    # (build, path) -> another build's artifact
        self.build = 0

    def request(self, repo: Repo, sha: str | None = None, steps=(), **fields) -> RunRequest:
        self.build += 1
        return RunRequest(self.build, 1, str(repo.path), sha or repo.head(), "main", tuple(steps),
                          fields.pop("timeout", 30.0), fields.pop("env", {"EXTRA": "from-run"}), **fields)

    async def upload(self, rel: str, path: Path) -> None:
        if rel in self.refuse:
            raise ValueError(self.refuse[rel])
        self.uploaded[rel] = path.read_bytes()

    async def fetch(self, build: int, rel: str, dest: Path) -> int:
        """The artifacts of other builds, as the dispatcher would send them (``inputs``)."""
        if (build, rel) not in self.stored:
            raise ValueError(f"the dispatcher refused it: build {build} has no artifact {rel!r}")
        data = self.stored[(build, rel)]
        dest.write_bytes(data)
        return len(data)

    def execution(self, request: RunRequest) -> Execution:
        buildlog = BuildLog(self.tmp / f"{request.build}-{request.attempt}.log")
        return Execution(request, self.clone, buildlog, KILL_GRACE, header="test slot 0: ",
                         upload=self.upload, fetch=self.fetch)

    async def run(self, execution: Execution) -> tuple[Outcome, str]:
        try:
            outcome = await execution.run()
        finally:
            execution.log.close()
        return outcome, execution.log.path.read_text()

    def __call__(self, repo: Repo, steps=(), sha: str | None = None, **fields) -> tuple[Outcome, str]:
        return asyncio.run(self.run(self.execution(self.request(repo, sha, steps, **fields))))


@pytest.fixture
def slot(tmp_path: Path) -> Slot:
    return Slot(tmp_path)


def test_steps_run_in_order_with_the_build_environment(project, slot):
    outcome, text = slot(project, [
        "echo hello-from-step",
        "echo build=$CI_BUILD commit=$CI_COMMIT branch=$CI_BRANCH ci=$CI extra=$EXTRA",
        "python -c \"print('héllo', 'wörld')\"",
    ])
    assert (outcome.status, outcome.exit_code, outcome.steps) == (Status.PASSED, 0, 3), text
    assert text.startswith(f"test slot 0: build 1 attempt 1: commit {project.head()} on main from {project.path}\n")
    assert "3 step(s) from the dispatcher's build.steps" in text
    assert "$ echo hello-from-step\nhello-from-step\n[exit 0 after " in text
    assert f"build=1 commit={project.head()} branch=main ci=true extra=from-run" in text
    assert "héllo wörld" in text


def test_the_build_environment_drops_the_runners_own_settings():
    request = RunRequest(7, 2, "repo", "a" * 40, "main", env={"EXTRA": "x", "CI": "overridden"})
    env = build_env(request, {"TINYCI_AUTH_SECRET": "s3cret", "HOME": "/home/ci", "PATH": "/bin"})
    assert "TINYCI_AUTH_SECRET" not in env and env["HOME"] == "/home/ci"
    assert env["PATH"] == "/bin"                # nothing of the runner's own put first (tests/test_buildenv.py)
    assert (env["CI_BUILD"], env["CI_ATTEMPT"], env["CI_COMMIT"], env["CI_BRANCH"]) == ("7", "2", "a" * 40, "main")
    assert env["CI_JOB"] == ""
    assert (env["EXTRA"], env["CI"], env["PYTHONUNBUFFERED"]) == ("x", "overridden", "1")


def test_failing_step_skips_the_rest(project, slot):
    outcome, text = slot(project, ["echo first", "exit 3", "echo SKIPPED-STEP"])
    assert (outcome.status, outcome.exit_code, outcome.steps) == (Status.FAILED, 3, 2), text
    assert "$ exit 3\n[exit 3 after " in text
    assert "[step 2 failed; skipping 1 more]" in text
    assert "SKIPPED-STEP" not in text


def test_step_sources(project, slot):
    no_yaml = project.head()
    with_yaml = project.commit("add .ci.yaml", {".ci.yaml": "steps:\n  - echo steps-from-ci-yaml\n"})
    # the repository's .ci.yaml wins over the dispatcher's steps
    outcome, text = slot(project, ["echo from-dispatcher"], sha=with_yaml)
    assert outcome.status == Status.PASSED, text
    assert "1 step(s) from .ci.yaml" in text
    assert "steps-from-ci-yaml" in text
    assert "from-dispatcher" not in text
    # a job the build asks for, in a commit without .ci.yaml
    outcome, text = slot(project, ["true"], sha=no_yaml, job="lint")
    assert (outcome.status, outcome.exit_code, outcome.steps) == (Status.ERROR, -1, 0)
    assert "build error: .ci.yaml" in text and "is missing, but this build is its job 'lint'" in text
    # no steps anywhere and no tests: an error that says what to do (same clone)
    outcome, text = slot(project, [], sha=no_yaml)
    assert outcome.status == Status.ERROR
    assert NO_STEPS in text and "no build steps: set build.steps" in text
    assert not (slot.clone / ".ci.yaml").exists()


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_a_repository_with_tests_and_no_steps_gets_the_default_test_step(project, slot):
    project.commit("tests", {"tests/test_ok.py": "def test_ok():\n    pass\n"})
    outcome, text = slot(project, [])
    assert outcome.status == Status.PASSED, text
    assert "1 step(s) from the default for a repository with tests" in text
    assert f"$ {DEFAULT_TEST_STEP}\n" in text


def test_a_failed_checkout_is_an_error(project, slot):
    outcome, text = slot(project, ["true"], sha="0123456789abcdef0123456789abcdef01234567")
    assert (outcome.status, outcome.exit_code, outcome.steps) == (Status.ERROR, -1, 0)
    assert "checkout failed: commit 0123456789abcdef" in text


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_timeout_kills_the_whole_process_tree(project, slot, tmp_path):
    stubborn = tmp_path / "stubborn.pid"
    shell = tmp_path / "shell.pid"
    # a grandchild that ignores SIGTERM, so only the SIGKILL after kill_grace ends it
    step = (f"echo $$ > {shell}; sh -c 'trap \"\" TERM; sleep 1000' & echo $! > {stubborn}; "
            f"echo started; sleep 1000")
    outcome, text = slot(project, [step, "echo NEVER-RUN"], timeout=1)
    assert (outcome.status, outcome.exit_code) == (Status.FAILED, -1), text
    assert "timed out after 1 s" in text
    assert "NEVER-RUN" not in text
    pids = [read_pid(shell), read_pid(stubborn)]
    assert all(pids) and not any(pid_alive(p) for p in pids), "a process of the step survived"
    assert not list((tmp_path / "checkouts").glob("*.pgid")), "the step's marker outlived it"


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_a_steps_own_time_limit(project, slot):
    project.commit("limits", {".ci.yaml": "steps:\n  - {name: slow, run: sleep 1000, timeout: 0.5}\n"})
    outcome, text = slot(project, [])
    assert (outcome.status, outcome.exit_code, outcome.steps) == (Status.FAILED, -1, 1), text
    assert "--- step 1: slow ---" in text
    assert "[timed out after 0.5 s (the step's time limit); the step's processes were killed]" in text


def test_stop_kills_the_running_step(project, slot, tmp_path):
    bg_pid = tmp_path / "bg.pid"

    async def scenario() -> tuple[Outcome, str]:
        execution = slot.execution(slot.request(project, steps=[f"sleep 1000 & echo $! > {bg_pid}; wait",
                                                                "echo NEVER-RUN"]))
        task = asyncio.ensure_future(slot.run(execution))
        await wait_until(lambda: read_pid(bg_pid), "the step to start")
        execution.stop("cancelled")
        execution.stop("stale")         # the first reason is the one told
        return await asyncio.wait_for(task, 10)

    outcome, text = asyncio.run(scenario())
    assert (outcome.status, outcome.exit_code, outcome.steps) == (Status.CANCELLED, -1, 1), text
    assert "[cancelled after " in text and "the step's processes were killed]" in text
    assert "NEVER-RUN" not in text
    assert not pid_alive(read_pid(bg_pid))


def test_the_exit_is_seen_before_the_output_closes(project, slot):
    # the background sleep holds the output pipe: the build must not wait for it to close
    started = time.monotonic()
    outcome, text = slot(project, ["sleep 30 & echo started"])
    assert outcome.status == Status.PASSED, text
    assert time.monotonic() - started < 15, "the build waited for its step's output to close"
    assert "started\n[exit 0 after " in text


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_output_a_process_that_left_the_group_holds_open(project, slot, tmp_path):
    escaped = tmp_path / "escaped.pid"
    try:
        outcome, text = slot(project, [f"setsid sh -c 'echo $$ > {escaped}; exec sleep 30' & "
                                       f"while [ ! -s {escaped} ]; do sleep 0.01; done"])
        assert outcome.status == Status.PASSED, text
        assert outcome.duration >= OUTPUT_DRAIN
        assert "[the step's output is still open after it ended; stopped reading it]" in text
    finally:
        pid = read_pid(escaped)
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def reaper():
    """This test process as the reaper of its orphaned descendants, as the runner is; undone after."""
    assert procgroup.become_subreaper()
    yield
    procgroup.become_subreaper(False)


def test_processes_that_leave_the_group_are_killed_when_the_step_ends(project, slot, tmp_path, reaper):
    escaped, rejobbed = tmp_path / "escaped.pid", tmp_path / "rejobbed.pid"
    # a new session that holds the output open, and a double fork into a process group of its own
    regroup = (f"import os; os.setpgid(0, 0); open('{rejobbed}', 'w').write(str(os.getpid())); "
               f"os.execvp('sleep', ['sleep', '300'])")
    # each writes its pid once it has left the group; the step ends only after both have
    outcome, text = slot(project, [f"setsid sh -c 'echo $$ > {escaped}; exec sleep 300' & "
                                   f"(python -c \"{regroup}\" >/dev/null &) & "
                                   f"while [ ! -s {rejobbed} ] || [ ! -s {escaped} ]; do sleep 0.01; done; "
                                   f"echo started",
                                   "echo second step"])
    pids = [read_pid(escaped), read_pid(rejobbed)]
    try:
        assert outcome.status == Status.PASSED, text
        assert all(pids) and not any(pid_alive(p) for p in pids), "a process of the step survived"
        assert "started\n[2 process(es) the step left running outside its process group were killed]\n" \
               "[exit 0 after " in text
        assert "still open" not in text and outcome.duration < OUTPUT_DRAIN
    finally:
        for pid in pids:
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_artifacts_are_sent_after_the_steps_and_refusals_noted(project, slot):
    project.commit("artifacts", {".ci.yaml": "steps:\n  - mkdir -p out && echo one > out/a.txt && "
                                             "echo two > out/b.txt\n  - exit 1\n"
                                             "artifacts: [out/*.txt, nothing/*]\n"})
    slot.refuse["out/b.txt"] = "the dispatcher refused it: over the limit"
    outcome, text = slot(project, [])
    # sent even after a failed step
    assert (outcome.status, outcome.exit_code) == (Status.FAILED, 1), text
    assert slot.uploaded == {"out/a.txt": b"one\n"}
    assert "[artifacts: nothing/*: matched nothing]" in text
    assert "[artifact out/a.txt (4 bytes) sent]" in text
    assert "[artifact out/b.txt not sent: the dispatcher refused it: over the limit]" in text


def test_the_artifacts_of_needed_builds_are_in_the_checkout_before_the_steps(project, slot):
    project.commit("needs", {".ci.yaml": "jobs:\n  lint:\n    steps: [cat dist/a.whl out/b.txt]\n"})
    slot.stored = {(7, "dist/a.whl"): b"wheel-a\n", (8, "out/b.txt"): b"text-b\n"}
    inputs = ({"build": 7, "job": "test (python=3.10)", "path": "dist/a.whl"},
              {"build": 8, "job": "test (python=3.11)", "path": "out/b.txt"})
    outcome, text = slot(project, [], job="lint", inputs=inputs)
    assert outcome.status is Status.PASSED, text
    assert "[input dist/a.whl of build 7 (test (python=3.10)): 8 bytes]" in text
    assert "wheel-a" in text and "text-b" in text
    # one that cannot arrive ends the attempt in error before any step
    outcome, text = slot(project, [], job="lint", inputs=({"build": 9, "job": "t", "path": "x"},))
    assert outcome.status is Status.ERROR and "[input x of build 9 (t) did not arrive: the dispatcher refused it: build 9 has no artifact 'x']" in text
    assert "$ cat" not in text


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a//b", "./a", "a/..", ""])
def test_an_input_path_outside_the_checkout_is_refused(tmp_path, rel):
    from ci.execution import input_path
    assert input_path(tmp_path, rel) is None


def test_an_input_path_through_a_symlink_is_refused(tmp_path):
    from ci.execution import input_path
    (tmp_path / "link").symlink_to(tmp_path.parent)
    assert input_path(tmp_path, "link/x") is None
    assert input_path(tmp_path, "dist/x.whl") == tmp_path / "dist" / "x.whl"


SERVER_DEFINITION = """\
jobs:
  lint: {steps: [echo lint-from-the-server]}
  publish:
    steps: ['echo "token=$PYPI_TOKEN file=$FROM_FILE"']
    env: {PYPI_TOKEN: shadowed-by-the-file}
artifacts: [out.txt]
"""


def test_the_dispatchers_definition_is_used_without_a_ci_yaml_or_when_it_overrides(project, slot):
    no_yaml = project.head()
    with_yaml = project.commit("add .ci.yaml", {".ci.yaml": "jobs:\n  lint: {steps: [echo lint-from-the-file]}\n"})
    outcome, text = slot(project, sha=no_yaml, job="lint", definition=SERVER_DEFINITION)
    assert outcome.status == Status.PASSED, text
    assert "1 step(s) from the dispatcher's pipeline for this repository (job lint)" in text
    assert "lint-from-the-server" in text
    # the commit's own file wins, unless the definition overrides it
    outcome, text = slot(project, sha=with_yaml, job="lint", definition=SERVER_DEFINITION)
    assert "lint-from-the-file" in text and "lint-from-the-server" not in text, text
    outcome, text = slot(project, sha=with_yaml, job="lint", definition=SERVER_DEFINITION, override=True)
    assert "lint-from-the-server" in text and "lint-from-the-file" not in text, text


def test_secrets_are_variables_of_the_steps_and_masked_in_the_log(project, slot):
    value = "pypi-AgEIcHlwaS5vcmc-0123456789"
    split = ("python -c \"import os, sys, time; v = os.environ['PYPI_TOKEN']; sys.stdout.write('split=' + v[:9]); "
             "sys.stdout.flush(); time.sleep(0.2); print(v[9:])\"")     # two writes: the runner reads two chunks
    outcome, text = slot(project, ['echo "token=$PYPI_TOKEN"', split, "printf %s \"$PYPI_TOKEN\" | base64",
                                   "echo $PYPI_TOKEN | rev"],
                         secrets={"PYPI_TOKEN": value})
    assert outcome.status == Status.PASSED, text
    assert value not in text
    assert "token=***\n" in text and "split=***\n" in text
    assert base64.b64encode(value.encode()).decode() in text        # only the exact value is masked
    assert value[::-1] in text
    # a job's file env cannot shadow a secret; the file's other variables stay
    outcome, text = slot(project, job="publish", definition=SERVER_DEFINITION,
                         secrets={"PYPI_TOKEN": value}, env={"FROM_FILE": "yes"})
    assert "token=*** file=yes" in text, text
    assert "shadowed-by-the-file" not in text


def test_an_input_is_not_written_through_a_symlink_at_its_aside_name(tmp_path):
    # the commit can put a symlink at <path>.part: the download must not follow it
    import asyncio
    from ci import artifact_download

    class OneChunk:         # the dispatcher's stream, as a client yields it
        async def stream(self, msg):
            for frame in ({"type": "ok", "size": 7}, {"type": "chunk", "offset": 0, "data": b"payload"},
                          {"type": "end", "offset": 7}):
                yield frame

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    checkout = tmp_path / "checkout"
    (checkout / "dist").mkdir(parents=True)
    (checkout / "dist" / "app.whl.part").symlink_to(outside)
    with pytest.raises(OSError):
        asyncio.run(artifact_download.download(OneChunk(), 7, "dist/app.whl", checkout / "dist" / "app.whl"))
    assert outside.read_text() == "keep me\n" and not (checkout / "dist" / "app.whl").exists()
    # without the symlink it arrives
    assert asyncio.run(artifact_download.download(OneChunk(), 7, "dist/app.whl", checkout / "dist" / "app.whl")) == 7
    assert (checkout / "dist" / "app.whl").read_bytes() == b"payload"
