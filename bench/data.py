"""logs and artifacts: the bytes that flow through a build (issue 16, items 1
and 2), through the real dispatcher, one real runner and the real `tinyci`
tool, each against the same work done without tinyci on the same machine.

logs: a step writes SIZE bytes of text to stdout (100 MiB; --quick 10 MiB).
The build's span (the dispatcher's started_at -> finished_at: hand-out,
checkout, the step, every log byte on the dispatcher's disk, the result)
against the same step run alone with its output to a file. A `tinyci log N
--follow` started as the step starts, and `tinyci log N > file` of the
finished log against a `cp` of the dispatcher's log file. CPU seconds of the
dispatcher and the runner (their own, not the step's) per 100 MiB. And a build
of the step `true`: what any build costs here beyond its step.

artifacts: a step makes a SIZE-byte file of random bytes, sent after the
steps (``.ci.yaml`` ``artifacts``): upload is from the step's end (a time it
prints as its last line) to the last write of the dispatcher's copy (its
mtime), against a `cp` of the runner's file, and to the artifact's listing
(its last chunk synced and acknowledged; polled every 10 ms); download is
`tinyci artifacts N --get PATH -o FILE` against a `cp` of the dispatcher's
file, and beyond the same tool's start-up and one request (`tinyci
artifacts N`, which lists). Every copy is
checked with SHA-256. Peak RSS (VmHWM) of the dispatcher and the runner, and
the tool's (its own rusage: reaper.py), say whether anything held a whole artifact.

Trials are interleaved (the reference, then tinyci) and medians quoted: the
machine is shared.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ci import protocol
from tests.daemons import ROOT, child_env

from .harness import FINAL, Reader, Repo, Result, cluster, cpu_seconds, median, request, wait_for

MIB = 1 << 20
# a step that writes ``size`` bytes of log-like text to stdout, in lines of ~100 bytes
GEN = """import sys
size = int(sys.argv[1])
line = b"%08d " + b"the quick brown fox jumps over the lazy dog; build output, warnings and test names" + b"\\n"
out = sys.stdout.buffer
written, n, block = 0, 0, []
while written < size:
    piece = line % n
    n += 1
    block.append(piece)
    written += len(piece)
    if len(block) == 512:
        out.write(b"".join(block))
        block = []
out.write(b"".join(block))
"""
STEP_END = re.compile(r"STEP-END ([0-9.]+)")


def vm(pid: int, key: str) -> float:
    """A VmXXX line of /proc/<pid>/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


@functools.cache
def tinyci() -> tuple[str, ...]:
    """The command a user types: the `tinyci` that `pip install` put beside this
    interpreter (else `python -m ci`, whose runpy costs each start some 10 ms),
    importing this tree (``child_env``) with its modules compiled once, as an
    install leaves them. With PYTHONDONTWRITEBYTECODE set (it is on the
    machines this ran on) a clone's tool compiled ~30 modules at every start,
    some 80 ms: more than the bytes of a 100 MiB download."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "ci")], check=True,
                   stdout=subprocess.DEVNULL)
    script = Path(sys.executable).with_name("tinyci")
    try:        # this interpreter's, or the bytecode just compiled is not the one it reads
        ours = Path(script.read_text().splitlines()[0].removeprefix("#!").split()[0]).resolve() \
            == Path(sys.executable).resolve()
    except (OSError, IndexError, UnicodeDecodeError):
        ours = False
    return (str(script),) if ours else (sys.executable, "-m", "ci")


def _ran_as() -> str:
    """A figure's note when the tool could not be run as users run it."""
    return "" if len(tinyci()) == 1 else "run as `python -m ci`: no `tinyci` beside this interpreter"


REAPER = Path(__file__).with_name("reaper.py")


class Measured:
    """A command started through ``reaper.py``, so that its peak memory is its own and not this
    bench's: ``wait()`` gives its wall seconds (fork to exit), its peak RSS in MiB and its exit
    status; ``out`` and ``err`` are its output where that was a pipe."""

    def __init__(self, cmd: list[str], **popen):
        self.cmd = cmd
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", str(REAPER), str(w), *cmd], pass_fds=(w,), **popen)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self._r = r
        self.out = self.err = b""

    def wait(self) -> tuple[float, float, int]:
        try:
            out, err = self.proc.communicate()      # reads the pipes while it runs: none fills up and blocks it
            self.out, self.err = out or b"", err or b""
            with open(self._r, "rb", closefd=False) as f:
                got = f.read().split()
        finally:
            os.close(self._r)
        if len(got) != 3:
            raise RuntimeError(f"the bench's reaper failed ({self.proc.returncode}) running {self.cmd}: "
                               f"{self.err.decode(errors='replace')[-500:]}")
        return float(got[0]), int(got[1]) / 1024, int(got[2])


def tool(tmp: Path, config: Path, addr: str, *args: str, stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Run `tinyci ARGS` as a user would; returns (seconds, peak RSS MiB). A failure raises."""
    run = Measured([*tinyci(), *args, "--dispatcher", addr, "--config", str(config)],
                   cwd=tmp, env=child_env(), stdout=stdout, stderr=subprocess.PIPE)
    seconds, rss, code = run.wait()
    if code:
        raise RuntimeError(f"tinyci {' '.join(args)} failed ({code}): {run.err.decode(errors='replace')[-2000:]}")
    return seconds, rss


def timed_cp(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    seconds = time.perf_counter() - t0
    dst.unlink()
    return seconds


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()


def _commit(c, repo: Repo, sha: str) -> int:
    """Send the commit as the observer would; returns its build's id once it runs."""
    reply = request(c.disp.addr, {"type": "commit", "repo": str(repo.path), "branch": "main", "sha": sha,
                                  "author": "Bench", "subject": f"bench {sha[:7]}", "time": time.time()},
                    protocol.OBSERVER)
    return reply["build"]


def _listed(c, build_id: int, timeout: float) -> float:
    """When build ``build_id``'s first artifact is listed (its upload acknowledged), polled every 10 ms."""
    client = Reader(c.disp.addr)
    try:
        wait_for(f"build {build_id}'s artifact to be listed",
                 lambda: client.loop.run_until_complete(client.client.request(
                     {"type": "artifacts", "build": build_id}, 30))["artifacts"], timeout)
        return time.time()
    finally:
        client.close()


def _build(c, build_id: int, timeout: float, every: float = 0.02) -> dict:
    return wait_for(f"build {build_id} to finish", lambda: next(
        (b for b in c.status(20)["builds"] if b["id"] == build_id and b["status"] in FINAL), None),
        timeout, every=every)


# ---------------------------------------------------------------- logs

def logs(tmp: Path, quick: bool) -> Result:
    size = (10 if quick else 100) * MIB
    trials = 1 if quick else 3
    per100 = 100 * MIB / size
    res = Result("logs")
    tinyci()        # compiled now, not while a build is being timed
    repo = Repo(tmp / "repo")
    repo.commit("initial", {"gen.py": GEN})
    step = f"python3 gen.py {size}"
    alone, spans, follow, disp_cpu, run_cpu, follow_rss, disp_hwm = [], [], [], [], [], [], []
    with cluster(tmp / "cluster", [step], dispatcher={"max_log_bytes": 4 * size}) as c:
        c.dispatcher()
        runner = c.runner("r1")
        c.wait("the runner", lambda: c.runner_state("r1") == "idle", 30)
        for t in range(trials + 1):         # the first build warms the runner's clone up
            if t:
                out = tmp / "alone.out"
                t0 = time.perf_counter()
                subprocess.run(f"python3 gen.py {size} > {out}", shell=True, cwd=repo.path, check=True)
                alone.append(time.perf_counter() - t0)
                out.unlink()
            cpu0 = cpu_seconds(c.disp.pid), cpu_seconds(runner.pid)
            if t:
                repo.commit(f"trial {t}")
            build_id = _commit(c, repo, repo.head())
            fol = None
            if t:
                c.wait("the build to run", lambda: any(
                    b["id"] == build_id and b["status"] != "queued" for b in c.status(20)["builds"]), 30, every=0.005)
                with open(tmp / "follow.out", "wb") as out:
                    fol = Measured([*tinyci(), "log", str(build_id), "--follow",
                                    "--dispatcher", c.disp.addr, "--config", str(c.config)],
                                   cwd=tmp, env=child_env(), stdout=out, stderr=subprocess.DEVNULL)
            # the span is the dispatcher's own (started_at -> finished_at): asking 50 times a second,
            # a connection and handshake each, only took CPU from the step being measured
            build = _build(c, build_id, 300, every=0.25)
            if build["status"] != "passed":
                raise RuntimeError(f"build {build_id} {build['status']}: {c.log(build_id)[-2000:]}")
            cpu1 = cpu_seconds(c.disp.pid), cpu_seconds(runner.pid)
            if fol is None:
                continue
            seconds, rss, status = fol.wait()         # the client's own life: its start to its exit
            follow.append(size / MIB / seconds)
            follow_rss.append(rss)
            if status:
                raise RuntimeError(f"tinyci log {build_id} --follow failed ({status})")
            got = (tmp / "follow.out").stat().st_size
            if got < size:
                raise RuntimeError(f"tinyci log --follow wrote {got} bytes of a log of at least {size}")
            spans.append(build["finished_at"] - build["started_at"])
            disp_cpu.append((cpu1[0] - cpu0[0]) * per100)
            run_cpu.append((cpu1[1] - cpu0[1]) * per100)
            disp_hwm.append(vm(c.disp.pid, "VmHWM"))
        # what any build costs here beyond its step: the same build with the step `true`
        repo.commit("trivial", {".ci.yaml": "steps: ['true']\n"})
        trivial = []
        for _ in range(3):
            one = _build(c, _commit(c, repo, repo.commit("again")), 60)
            trivial.append(one["finished_at"] - one["started_at"])
        # read back the last finished log: `cp` of the file, then `tinyci log`, interleaved
        log_file = tmp / "cluster" / "dispatcher" / "logs" / f"{build_id}.log"
        total = log_file.stat().st_size
        cps, reads, read_rss = [], [], []
        for _ in range(3 if quick else 5):
            cps.append(timed_cp(log_file, tmp / "copy.log"))
            with open(tmp / "read.out", "wb") as out:
                seconds, rss = tool(tmp, c.config, c.disp.addr, "log", str(build_id), stdout=out)
            reads.append(seconds)
            read_rss.append(rss)
        if (tmp / "read.out").stat().st_size < size:
            raise RuntimeError("tinyci log wrote less than the step did")
    span, step_alone = median(spans), median(alone)
    res.add("step alone (output to a file)", step_alone, "s", note=f"{size // MIB} MiB of text")
    res.add("build span (started -> finished)", span, "s")
    res.add("streaming cost: build span over the step alone", (span / step_alone - 1) * 100, "%", "< 20")
    res.add("a build of the step `true` (checkout, virtualenv, result)", median(trivial), "s")
    res.add("streaming cost beyond that trivial build's span",
            (span - median(trivial)) / step_alone * 100 - 100, "%")
    res.add("step -> dispatcher's log file", size / MIB / span, "MiB/s")
    res.add("to a `tinyci log --follow` client while it runs", median(follow), "MiB/s")
    res.add("read back: `tinyci log N > file`", total / MIB / median(reads), "MiB/s", ">= 200",
            note=_ran_as())
    res.add("read back: `cp` of the log file", total / MIB / median(cps), "MiB/s")
    res.add("read back: tinyci log / cp", median(cps) / median(reads) * 100, "%")
    res.add("dispatcher CPU per 100 MiB", median(disp_cpu), "s")
    res.add("runner CPU per 100 MiB (not the step's)", median(run_cpu), "s")
    res.add("peak RSS: dispatcher (VmHWM)", max(disp_hwm), "MiB")
    res.add("peak RSS: tinyci log --follow", max(follow_rss), "MiB")
    res.add("peak RSS: tinyci log", max(read_rss), "MiB")
    res.data = {"size": size, "trials": trials, "step_alone_s": alone, "span_s": spans, "follow_mib_s": follow,
                "read_s": reads, "cp_s": cps, "log_bytes": total, "dispatcher_cpu_per_100mib": disp_cpu,
                "runner_cpu_per_100mib": run_cpu, "trivial_span_s": trivial}
    return res


# ---------------------------------------------------------------- artifacts

def artifacts(tmp: Path, quick: bool) -> Result:
    size = (10 if quick else 100) * MIB
    trials = 1 if quick else 3
    res = Result("artifacts")
    tinyci()
    repo = Repo(tmp / "repo")
    ci_yaml = (f"artifacts: [out.bin]\nsteps:\n  - head -c {size} /dev/urandom > out.bin\n"
               f"  - python3 -c 'import time; print(\"STEP-END\", time.time())'\n")
    repo.commit("initial", {".ci.yaml": ci_yaml})
    uploads, listed, up_cps, downloads, down_cps, tool_rss, starts = [], [], [], [], [], [], []
    hwm: dict[str, list] = {"dispatcher": [], "runner": []}
    with cluster(tmp / "cluster", ["true"], dispatcher={"max_artifact_bytes": 4 * size}) as c:
        c.dispatcher()
        runner = c.runner("r1")
        c.wait("the runner", lambda: c.runner_state("r1") == "idle", 30)
        for t in range(trials):
            sha = repo.commit(f"trial {t}")
            build_id = _commit(c, repo, sha)
            seen = _listed(c, build_id, 300)
            build = _build(c, build_id, 300)
            text = c.log(build_id)
            if build["status"] != "passed" or f"[artifact out.bin ({size} bytes) sent]" not in text:
                raise RuntimeError(f"build {build_id} {build['status']}, artifact not sent: {text[-2000:]}")
            stored = tmp / "cluster" / "dispatcher" / "artifacts" / sha / str(build_id) / "out.bin"
            step_end = float(STEP_END.search(text).group(1))
            uploads.append(stored.stat().st_mtime - step_end)
            listed.append(seen - step_end)
            sent = next((tmp / "cluster" / "runners" / "r1" / "checkouts").glob("*/out.bin"))
            up_cps.append(timed_cp(sent, tmp / "cp.bin"))
            want = sha256(sent)
            if sha256(stored) != want:
                raise RuntimeError("the dispatcher's copy of the artifact differs from the runner's")
            down_cps.append(timed_cp(stored, tmp / "cp.bin"))
            seconds, rss = tool(tmp, c.config, c.disp.addr, "artifacts", str(build_id), "--get", "out.bin",
                                   "-o", str(tmp / "got.bin"))
            downloads.append(seconds)
            tool_rss.append(rss)
            # the same tool's start-up and one request: what --get costs beyond the bytes
            starts += [tool(tmp, c.config, c.disp.addr, "artifacts", str(build_id))[0] for _ in range(3)]
            if sha256(tmp / "got.bin") != want:
                raise RuntimeError("the downloaded artifact differs from the runner's")
            (tmp / "got.bin").unlink()
            hwm["dispatcher"].append(vm(c.disp.pid, "VmHWM"))
            hwm["runner"].append(vm(runner.pid, "VmHWM"))
    mib = size / MIB
    res.add("upload (step end -> dispatcher's last write)", mib / median(uploads), "MiB/s",
            note=f"{size // MIB} MiB")
    res.add("upload, to its listing (the last chunk's fsync and ack)", mib / median(listed), "MiB/s")
    res.add("upload: `cp` of the runner's file", mib / median(up_cps), "MiB/s")
    res.add("upload / cp", median(up_cps) / median(uploads) * 100, "%", ">= 25")
    res.add("download: `tinyci artifacts N --get`", mib / median(downloads), "MiB/s",
            note=_ran_as())
    res.add("download: `cp` of the dispatcher's file", mib / median(down_cps), "MiB/s")
    res.add("download / cp", median(down_cps) / median(downloads) * 100, "%", ">= 25")
    res.add("download: the tool's start-up and one request (`tinyci artifacts N`)", median(starts), "s")
    beyond = median(downloads) - median(starts)
    res.add("download beyond that start-up", mib / beyond if beyond > 0 else None, "MiB/s",
            note="" if beyond > 0 else "within the start-up's noise")
    res.add("peak RSS: dispatcher (VmHWM)", max(hwm["dispatcher"]), "MiB")
    res.add("peak RSS: runner (VmHWM)", max(hwm["runner"]), "MiB")
    res.add("peak RSS: tinyci artifacts --get", max(tool_rss), "MiB")
    res.data = {"size": size, "upload_s": uploads, "upload_listed_s": listed, "upload_cp_s": up_cps,
                "download_s": downloads, "download_cp_s": down_cps, "tool_start_s": starts, "peak_rss_mib": hwm,
                "tool_rss_mib": tool_rss}
    return res

