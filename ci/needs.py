"""Builds that wait for other builds (``.ci.yaml`` ``needs``), as plain code:
no sockets, disk or clock. The dispatcher asks; the scheduler never sees a
build until its needs have passed.

A build with ``needs`` (job names of the same commit, a matrix job once per
combination) is judged against the newest build of each needed job of its
commit (repository and sha):

- every one passed: it joins the queue (``Decision.run``);
- one failed, ended in error, was cancelled or skipped, or was never made:
  it ends ``skipped``, saying which and why (``Decision.skip``); a build that
  needed *it* is then judged again, and so on down the graph;
- otherwise it is held, its ``held`` saying what it still waits for.

Held builds stay ``queued`` in the store with their ``needs``, so a
restarted dispatcher finds them again: ``Held.admit`` of the active builds
holds again exactly those still waiting (the verdict depends only on stored
statuses). ``inputs`` lists the artifacts of the needed builds, which the
runner fetches into the checkout before the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from .models import Build, Status

RUN, WAIT, SKIP = "run", "wait", "skip"
MAX_INPUTS = 1000           # artifacts fetched into one checkout (the wire's limit)

_ENDED = {Status.FAILED: "failed", Status.ERROR: "ended in error", Status.CANCELLED: "was cancelled",
          Status.SKIPPED: "was skipped"}


def newest(builds: Iterable[Build]) -> dict[str, tuple[int, Status]]:
    """The newest build of each job among one commit's ``builds``: job -> (id, status)."""
    out: dict[str, tuple[int, Status]] = {}
    for build in builds:
        if build.job not in out or out[build.job][0] < build.id:
            out[build.job] = (build.id, build.status)
    return out


def verdict(needs: Iterable[str], jobs: Mapping[str, tuple[int, Status]]) -> tuple[str, str]:
    """(RUN, ""), (WAIT, the jobs still to finish) or (SKIP, why) for a build
    needing ``needs``, given its commit's ``newest`` builds."""
    pending = []
    for name in needs:
        if name not in jobs:
            return SKIP, f"needs {name}, which was not built for this commit"
        status = jobs[name][1]
        if status in _ENDED:
            return SKIP, f"needs {name}, which {_ENDED[status]}"
        if status is not Status.PASSED:
            pending.append(name)
    return (WAIT, ", ".join(pending)) if pending else (RUN, "")


@dataclass
class Decision:
    run: list[Build] = field(default_factory=list)                  # to the scheduler
    skip: list[tuple[Build, str]] = field(default_factory=list)     # to end skipped, with the reason


class Held:
    """The builds waiting for their needs, by id (the live objects)."""

    def __init__(self) -> None:
        self.builds: dict[int, Build] = {}

    def __contains__(self, build_id: int) -> bool:
        return build_id in self.builds

    def get(self, build_id: int) -> Build | None:
        return self.builds.get(build_id)

    def drop(self, build_id: int) -> Build | None:
        """Stop holding a build (cancelled); returns it, or None when not held."""
        build = self.builds.pop(build_id, None)
        if build is not None:
            build.held = ""
        return build

    def admit(self, builds: Iterable[Build], commit_of: Callable[[str, str], Iterable[Build]]) -> Decision:
        """Queued builds of one commit, new or recovered: those with needs are
        held, then judged with the rest held for that commit. ``commit_of(repo,
        sha)``: every build of that commit as stored, read only when one has needs.
        A build without needs runs."""
        out = Decision()
        first = None
        for build in builds:
            if build.needs:
                self.builds[build.id] = build
                first = first or build
            else:
                out.run.append(build)
        if first is not None:
            settled = self.settle(first.repo, first.sha, commit_of(first.repo, first.sha))
            out.run += settled.run
            out.skip += settled.skip
        return out

    def recover(self, active: list[Build],
                commit_of: Callable[[str, str], list[Build]]) -> tuple[list[Build], Decision]:
        """After a restart: hold again the stored active builds still waiting for
        their needs. Returns (the builds for the scheduler: running, queued without
        needs, released; the held builds to skip). ``commit_of(repo, sha)``: a
        commit's stored builds."""
        waiting = [b for b in active if b.status is Status.QUEUED and b.needs]
        out = Decision(run=[b for b in active if b not in waiting])
        for repo, sha in dict.fromkeys((b.repo, b.sha) for b in waiting):
            decided = self.admit([b for b in waiting if (b.repo, b.sha) == (repo, sha)], commit_of)
            out.run += decided.run
            out.skip += decided.skip
        return out.run, out

    def settle(self, repo: str, sha: str, commit: Iterable[Build]) -> Decision:
        """Judge again every build held for one commit (after one of its builds
        ended); a skip ripples on to the builds that needed the skipped one."""
        out = Decision()
        jobs = newest(commit)
        again = True
        while again:
            again = False
            for build in sorted((b for b in self.builds.values() if b.repo == repo and b.sha == sha),
                                key=lambda b: b.id):
                what, why = verdict(build.needs, jobs)
                if what == WAIT:
                    build.held = why
                    continue
                self.drop(build.id)
                if what == RUN:
                    out.run.append(build)
                    continue
                out.skip.append((build, why))
                if jobs.get(build.job, (0,))[0] <= build.id:
                    jobs[build.job] = (build.id, Status.SKIPPED)
                    again = True
        return out


def inputs(build: Build, commit: Iterable[Build], listing: Callable[[int], list[dict]]) -> list[dict]:
    """The artifacts of the builds ``build`` needs, as ``run.inputs``
    [{build, job, path}]: of each needed job's newest build of the commit;
    ``listing(build id)`` gives a build's artifacts [{path, ...}]."""
    jobs = newest(commit)
    out: list[dict] = []
    for name in build.needs:
        if name in jobs and jobs[name][1] is Status.PASSED:
            out += [{"build": jobs[name][0], "job": name, "path": item["path"]} for item in listing(jobs[name][0])]
    return out[:MAX_INPUTS]
