"""Commit intake as plain code: what a reported commit, a manual trigger or a
rebuild turns into, and how a commit's builds roll up into its pipeline.
No sockets, threads, disk or clock: the dispatcher stores the builds a
``Request`` asks for, then does what ``admit`` returns.

- A commit whose message says ``[skip ci]`` or ``[ci skip]`` becomes one
  ``skipped`` build; one whose ``.ci.yaml`` cannot be used, one ``error``
  build whose log says why; otherwise one queued build per ``.ci.yaml`` job
  and matrix combination (one default job without the file). A job whose
  ``when`` rules it out (the observer decides: it has the branch and the
  changed paths) is one ``skipped`` build whose log says why. A job with
  ``needs`` is stored with them; ``needs.py`` decides when it joins the queue.
- With ``dispatcher.supersede`` matching its branch, a commit's new builds
  cancel the queued (never the running) commit builds of that branch and
  repository that came before them.
- Where the jobs come from: the commit's ``.ci.yaml``, unless the dispatcher
  keeps a definition for the repository (``pipelines.<repo>``) and the commit
  has no such file, or the definition says ``override`` (``jobs_from``,
  ``commit_jobs``).
- A job that asks for a build secret its branch may not have (or the
  dispatcher does not hold) becomes an ``error`` build saying so, and is
  never handed out (``Request.checked``).
- A trigger names a revision; ``choose_repo`` finds the one repository it is
  in (git reads come in as a function, so this stays plain).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import buildfile, patterns
from .models import Build, Status, pipeline_status

log = logging.getLogger(__name__)

SKIP_MARKERS = ("[skip ci]", "[ci skip]")
DEFAULT_JOBS = ({"name": buildfile.DEFAULT_JOB, "labels": []},)


def skip_marker(message: str) -> str | None:
    """The skip marker a commit message carries, if any (any case)."""
    lowered = message.lower()
    return next((marker for marker in SKIP_MARKERS if marker in lowered), None)


def jobs_from(text: bytes | None, pipeline: Any = None) -> tuple[Sequence[dict], str]:
    """(jobs, problem) of a commit's ``.ci.yaml`` content; None (no such file,
    or the repository cannot be read here) gives the default job, or the jobs
    of ``pipeline`` (the repository's ``settings.Pipeline``), which also win
    over the file when it overrides."""
    if pipeline is not None and (text is None or pipeline.override):
        return pipeline.jobs, ""
    if text is None:
        return DEFAULT_JOBS, ""
    try:
        return buildfile.parse(text.decode("utf-8")).job_list(), ""
    except UnicodeDecodeError:
        return DEFAULT_JOBS, f"{buildfile.FILENAME}: is not UTF-8 text"
    except buildfile.BuildFileError as exc:
        return DEFAULT_JOBS, str(exc)


def commit_jobs(jobs: Sequence[dict] | None, config_error: str, pipeline: Any = None) -> tuple[Sequence[dict], str]:
    """(jobs, problem) of a reported commit: ``jobs`` and ``config_error`` as the
    observer read the commit's ``.ci.yaml`` (neither: it has none), else the
    jobs of the repository's ``pipeline`` when it has none or the pipeline overrides."""
    has_file = jobs is not None or bool(config_error)
    if pipeline is not None and (pipeline.override or not has_file):
        return pipeline.jobs, ""
    return jobs or DEFAULT_JOBS, config_error


@dataclass(frozen=True)
class Request:
    """A commit to turn into builds, and why."""

    repo: str
    branch: str
    sha: str
    subject: str = ""
    author: str = ""
    commit_time: float = 0.0
    reason: str = "commit"              # or "manual", "rebuild of N"
    jobs: Sequence[dict] = DEFAULT_JOBS
    config_error: str = ""              # why its .ci.yaml cannot be used
    skip: str | None = None             # the skip marker in its message
    note: str = ""                      # a first line for each new build's log
    denied: Mapping[str, str] = field(default_factory=dict)     # job -> why it cannot have its secrets

    @property
    def status(self) -> Status:
        return Status.SKIPPED if self.skip else Status.ERROR if self.config_error else Status.QUEUED

    def checked(self, problem: Callable[[str, str], str]) -> "Request":
        """This request with the jobs that ask for a secret they may not have
        marked (``denied``); ``problem(name, branch)`` says why one may not be had ("" when it may)."""
        denied = {}
        for job in self.jobs:
            why = [p for p in (problem(name, self.branch) for name in job.get("secrets", ())) if p]
            if why:
                denied[job["name"]] = "; ".join(why)
        return replace(self, denied=denied) if denied else self

    def rows(self) -> list[dict]:
        """One build per job, as keyword arguments of ``Store.add_build`` (but
        ``now``); a skipped or broken commit has one build, already final, and
        so has a job denied its secrets."""
        status = self.status
        jobs = self.jobs if status is Status.QUEUED else DEFAULT_JOBS
        return [dict(repo=self.repo, branch=self.branch, sha=self.sha, subject=self.subject,
                     author=self.author, commit_time=self.commit_time, reason=self.reason,
                     labels=tuple(job["labels"]), job=job["name"], needs=tuple(job.get("needs", ())),
                     status=self._status(job, status),
                     secrets=tuple(job.get("secrets", ())) if status is Status.QUEUED else ())
                for job in jobs]

    def _status(self, job: dict, status: Status) -> Status:
        """A queued job its ``when`` keeps from running is skipped (whatever its secrets);
        one denied a secret, an error."""
        if status is not Status.QUEUED:
            return status
        if job.get("skip"):
            return Status.SKIPPED
        return Status.ERROR if job["name"] in self.denied else status

    def skip_reason(self, build: Build) -> str:
        """Why ``when`` keeps this request's job of ``build`` from running, or ""."""
        if self.status is not Status.QUEUED:
            return ""
        return next((job.get("skip", "") for job in self.jobs if job["name"] == build.job), "")

    def lines(self, build: Build) -> list[str]:
        """The dispatcher's first lines in the log of a build newly made from this."""
        lines = [f"=== {self.note} ==="] if self.note else []
        if self.skip:
            lines.append(f"=== skipped: the commit message says {self.skip}; not built "
                         f"(`tinyci trigger {build.sha[:12]}` builds it anyway) ===")
        elif self.config_error:
            lines.append(f"=== build error: {self.config_error} ===")
        elif self.skip_reason(build):
            lines.append(f"=== skipped: {self.skip_reason(build)} (.ci.yaml when) ===")
        elif build.job in self.denied:
            lines.append(f"=== build error: {self.denied[build.job]}; not built ===")
        return lines


@dataclass
class Admitted:
    """What must happen once a request's builds are stored, in this order."""

    lines: list[tuple[int, str]] = field(default_factory=list)   # (build, line) for the new builds' logs
    failed: list[Build] = field(default_factory=list)            # new builds already ended in error
    supersede: list[tuple[Build, str]] = field(default_factory=list)  # queued builds to cancel, and their line
    queue: list[Build] = field(default_factory=list)             # new builds for the scheduler


def admit(request: Request, created: list[Build], active: Iterable[Build],
          supersede: Sequence[str]) -> Admitted:
    """What follows from storing ``request``: ``created`` are its builds that
    were new (a repeated commit creates none), ``active`` the scheduler's
    builds before these join it, ``supersede`` the dispatcher's branch patterns."""
    out = Admitted()
    for build in created:
        out.lines += [(build.id, line) for line in request.lines(build)]
        what = f"{build.branch} {build.sha[:7]} {build.subject[:60]}" + (f" job {build.job}" if build.job else "")
        if request.skip or request.skip_reason(build):
            log.info("build %d skipped (%s): %s", build.id, request.skip or request.skip_reason(build), what)
        elif request.config_error or build.status is Status.ERROR:
            log.warning("build %d error: %s: %s", build.id, what,
                        request.config_error or request.denied.get(build.job, "error"))
            out.failed.append(build)
        else:
            log.info("build %d queued (%s): %s", build.id, request.reason, what)
    out.queue = [b for b in created if b.status is Status.QUEUED]
    if out.queue and request.reason == "commit":
        newer = out.queue[0]
        out.supersede = [(old, f"=== cancelled: superseded by build {newer.id}, a newer commit "
                               f"({newer.sha[:12]}) of {newer.branch} ===")
                         for old in superseded(newer, active, supersede)]
    return out


def superseded(newer: Build, active: Iterable[Build], patterns: Sequence[str]) -> list[Build]:
    """With a pattern matching ``newer``'s branch: the queued commit builds of
    that branch and repository older than ``newer``, oldest first."""
    if not any(fnmatch.fnmatchcase(newer.branch, p) for p in patterns):
        return []
    return sorted((b for b in active if b.status is Status.QUEUED and b.branch == newer.branch
                   and b.repo == newer.repo and b.reason == "commit" and b.id < newer.id),
                  key=lambda b: b.id)


def pipelines(builds: list[dict]) -> list[dict]:
    """Each commit among ``builds`` (summaries, newest first) with its status
    by the pipeline rule, over the newest build of each of its jobs."""
    commits: dict[tuple, dict] = {}
    for build in builds:
        entry = commits.setdefault((build["repo"], build["sha"]), {
            "sha": build["sha"], "branch": build["branch"], "subject": build["subject"], "jobs": {}})
        job = build.get("job") or ""
        if job not in entry["jobs"] or entry["jobs"][job]["build"] < build["id"]:
            entry["jobs"][job] = {"job": job, "build": build["id"], "status": build["status"],
                                  "labels": build["labels"]}
    out = []
    for entry in commits.values():
        jobs = sorted(entry["jobs"].values(), key=lambda j: j["job"])
        out.append({**entry, "status": pipeline_status([j["status"] for j in jobs]), "jobs": jobs})
    return out


class RevisionError(Exception):
    """A trigger's revision cannot be placed; ``code`` goes on the wire."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def pick_jobs(jobs: Sequence[dict], job: str, sha: str) -> list[dict]:
    """The builds of ``jobs`` that ``job`` names: that one, or every combination
    of a matrix job (``test`` picks "test (python=3.10)" and "test (python=3.11)").
    RevisionError naming the jobs there are when none matches."""
    picked = [j for j in jobs if j["name"] == job] or [j for j in jobs if j["name"].startswith(f"{job} (")]
    if not picked:
        shown = ", ".join(j["name"] or "(the default job)" for j in jobs)
        raise RevisionError("not_found", f"commit {sha[:12]} has no job {job!r} (its jobs: {shown})")
    return picked


PREFERRED = ("main", "master", "trunk", "develop")


def trigger_branch(rev: str, sha: str, is_branch: bool, at: Sequence[str], containing: Sequence[str]) -> str:
    """The branch a triggered build records (and its steps see as CI_BRANCH): the
    branch named, else one whose head is the commit, else one that contains it
    (main, master, trunk or develop first), else the revision as given, else the
    short sha. ``is_branch``: ``rev`` names a branch of the repository."""
    if is_branch:
        return rev
    for names in (at, containing):
        if names:
            return next((name for name in PREFERRED if name in names), sorted(names)[0])
    return rev if patterns.is_branch(rev) and rev != "HEAD" else sha[:12]


def choose_repo(rev: str, wanted: str | None, known: Sequence[str],
                resolve: Callable[[str, str], str | None], kind: str = "commit") -> tuple[str, str]:
    """(repository, sha) a trigger of ``rev`` (a ``kind``: commit or branch) builds. ``wanted``: the
    repository the operator named, which must be among ``known``; without
    it, the one known repository, or among several the one where ``rev``
    resolves. ``resolve(repo, rev)`` gives a sha or None (a git read: call
    this in a thread). Raises RevisionError not_found or ambiguous."""
    if wanted is not None:
        if wanted not in known:
            raise RevisionError("not_found", f"this dispatcher does not know the repository {wanted[:200]!r}"
                                             f"{_listing(known)}")
        candidates = [wanted]
    elif not known:
        raise RevisionError("not_found", "no repository known yet: no commit has been reported")
    else:
        candidates = list(known)
    found = [(repo, sha) for repo, sha in ((repo, resolve(repo, rev)) for repo in candidates) if sha]
    if not found:
        where = candidates[0] if len(candidates) == 1 else f"any of {', '.join(candidates[:10])}"
        raise RevisionError("not_found", f"{rev!r} is not a {kind} in {where}")
    if len(found) > 1:
        raise RevisionError("ambiguous", f"{rev!r} is a commit in {len(found)} repositories "
                                         f"({', '.join(repo for repo, _ in found[:10])}); "
                                         f"say which with --repo")
    return found[0]


def _listing(known: Sequence[str]) -> str:
    if not known:
        return " (it knows none yet: no commit has been reported)"
    more = f" and {len(known) - 10} more" if len(known) > 10 else ""
    return f" (known: {', '.join(known[:10])}{more})"
