"""The repository's build definition, ``.ci.yaml``: parsed and checked in one
place, for the observer (which splits a commit into jobs), the dispatcher (a
manual trigger) and the runner (which runs one job's steps).

Schema (every key optional, but there must be ``steps`` or ``jobs``)::

    timeout: 600                 # seconds for the whole build
    env: {NAME: value}           # for every step
    artifacts: [dist/*.whl]      # globs, relative to the checkout, sent back after the steps
    steps:                       # shell commands, or mappings
      - make
      - {name: test, run: pytest -q, timeout: 60, env: {X: "1"}}
    jobs:                        # one build per job, on runners with all its labels
      py311: {labels: [py311], steps: [...], env: {...}, timeout: 300}
      test:
        matrix: {python: ["3.10", "3.11"]}      # one build per combination: "test (python=3.11)"
        labels: ["py${{ matrix.python }}"]       # an axis's value in a label; MATRIX_PYTHON in the env
      lint:
        needs: [test]                            # starts once every build of test passed
        when: {branches: [main], paths: ["src/*"]}   # else recorded as skipped, with the reason
      publish: {steps: [...], secrets: [PYPI_TOKEN]}
    secrets: [NAME]              # the dispatcher's build secrets every job gets, as variables
    cache:                       # kept on the runner between passing builds (ci/cache.py)
      paths: [.venv, ~/.cache/pip]      # in the checkout, or under the steps' HOME (~/)
      key: [requirements*.txt]          # globs whose files' content (and the job) make the key
    reports: [junit*.xml]        # JUnit XML files read after the steps (ci/reports.py)

``secrets`` name build secrets the dispatcher holds (its ``secrets:``
section); a job gets those it names and the top-level ones, as environment
variables of its steps, never others.

A job without ``steps`` runs the top-level ``steps``. A job's own
``artifacts``, ``cache`` or ``reports`` replace the top-level ones for that
job (``what_to_keep``). A file that does not
parse or fit raises BuildFileError, whose text names the line.

``matrix`` expands in ``job_list`` (what a commit becomes) and back in
``plan`` (what the runner runs, found by the expanded name). ``needs``
names jobs of the same file (every combination of a matrix job); a cycle or
an unknown name is an error naming the line. ``when`` is decided where the
branch and the changed paths are known (``JobDef.skip_reason``: the
observer, which has the clone).
"""

from __future__ import annotations

import fnmatch
import itertools
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from . import patterns

FILENAME = ".ci.yaml"
DEFAULT_JOB = ""                    # the one job of a commit without ``jobs``
MAX_SIZE = 256 * 1024
MAX_JOBS = 100                      # what one commit may fan out into (the wire's limit too)
MAX_SECONDS = 7 * 24 * 3600         # a time limit longer than a week is no limit
# Values the checker may look at, counting each use of an alias again: YAML
# aliases let a small file name the same big node thousands of times over
# (jobs -> *steps -> *step -> *env), and checking it would take minutes.
# A real file, even a large one, stays far below this.
MAX_VALUES = 50_000
TOP_KEYS = ("steps", "timeout", "env", "artifacts", "jobs", "secrets")
STEP_KEYS = ("name", "run", "timeout", "env")
JOB_KEYS = ("labels", "steps", "env", "timeout", "matrix", "needs", "when", "secrets")
WHEN_KEYS = ("branches", "paths")
MAX_AXES = 8                        # a matrix's axes; the combinations count against MAX_JOBS
# ${{ matrix.AXIS }} in a matrix job's labels (the spelling GitHub Actions users know)
MATRIX_REF = re.compile(r"\$\{\{\s*matrix\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# what a build keeps (artifacts per job, cache, reports): kept apart from the keys above
TOP_KEYS += ("cache", "reports")
JOB_KEYS += ("artifacts", "cache", "reports")
CACHE_KEYS = ("paths", "key")
MAX_GLOBS = 50          # per list: artifacts, cache paths, cache key, reports


try:
    from yaml._yaml import CParser
except ImportError:         # PyYAML without libyaml
    CParser = None

if CParser is not None:
    class _Loader(CParser, Composer, SafeConstructor, Resolver):
        """libyaml's scanner and parser (several times faster than PyYAML's own;
        it refuses nesting deeper than 1000 levels) under PyYAML's composer in
        Python. Not libyaml's composer: it builds the whole tree in one C call
        that holds the GIL throughout (most of a second for a file at
        MAX_SIZE), which stalls a daemon's event loop even from another thread."""

        def __init__(self, stream: str):
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

        check_node = Composer.check_node
        get_node = Composer.get_node
        get_single_node = Composer.get_single_node
else:
    _Loader = yaml.SafeLoader


class BuildFileError(ValueError):
    """``.ci.yaml`` is broken; ``line`` is 1-based (0 when unknown)."""

    def __init__(self, line: int, problem: str):
        self.line = line
        self.problem = problem
        where = f" line {line}" if line else ""
        super().__init__(f"{FILENAME}{where}: {problem}")


@dataclass(frozen=True)
class Step:
    run: str
    name: str = ""
    timeout: float | None = None
    env: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CacheSpec:
    paths: tuple            # relative to the checkout, or "~/..." (the steps' HOME)
    key: tuple = ()         # globs in the checkout whose files' content make the key


@dataclass(frozen=True)
class Keeps:
    """What one job's build keeps: artifact globs, its cache (or None), report globs."""
    artifacts: tuple = ()
    cache: CacheSpec | None = None
    reports: tuple = ()
    artifacts_own: bool = True      # False: the top level's globs, perhaps meant for another job


@dataclass(frozen=True)
class JobDef:
    name: str
    labels: tuple = ()
    steps: tuple = ()
    env: dict = field(default_factory=dict)
    timeout: float | None = None
    matrix: tuple = ()                  # ((axis, (value, ...)), ...) in file order
    needs: tuple = ()                   # names of jobs of the same file (not expanded)
    branches: tuple = ()                # when.branches: fnmatch patterns; () = any branch
    paths: tuple = ()                   # when.paths: fnmatch globs ('*' crosses '/'); () = any change
    secrets: tuple = ()                 # names of the dispatcher's build secrets it asks for
    # what the job keeps; None: the top level's
    artifacts: tuple | None = None
    cache: CacheSpec | None = None
    reports: tuple | None = None

    def combinations(self) -> list[tuple]:
        """Each build this job becomes: ((axis, value), ...) per combination; one () without a matrix."""
        axes = [[(axis, value) for value in values] for axis, values in self.matrix]
        return [tuple(combo) for combo in itertools.product(*axes)]

    def skip_reason(self, branch: str | None, changed: tuple | None) -> str:
        """Why ``when`` keeps this job from running on ``branch`` with ``changed``
        paths (against the first parent), or "". None: not known (a trigger, a
        root commit, too many paths): that condition does not skip."""
        if self.branches and branch is not None and \
                not any(fnmatch.fnmatchcase(branch, p) for p in self.branches):
            return f"branch {branch} is not among when.branches ({', '.join(self.branches)})"
        if self.paths and changed is not None and not any(
                fnmatch.fnmatchcase(path, p) for path in changed for p in self.paths):
            return f"no changed path matches when.paths ({', '.join(self.paths)})"
        return ""


def expanded_name(name: str, combo: tuple) -> str:
    """The job name a combination shows: ``test (python=3.11, os=linux)``."""
    if not combo:
        return name
    return f"{name} ({', '.join(f'{axis}={value}' for axis, value in combo)})"


def matrix_env(combo: tuple) -> dict:
    return {f"MATRIX_{axis.upper()}": value for axis, value in combo}


def matrix_labels(labels: tuple, combo: tuple) -> tuple:
    values = dict(combo)
    return tuple(MATRIX_REF.sub(lambda m: values[m.group(1)], label) for label in labels)


@dataclass(frozen=True)
class BuildFile:
    steps: tuple = ()
    timeout: float | None = None
    env: dict = field(default_factory=dict)
    artifacts: tuple = ()
    jobs: dict = field(default_factory=dict)         # name -> JobDef, in file order
    secrets: tuple = ()                 # build secrets every job asks for
    cache: CacheSpec | None = None
    reports: tuple = ()

    def what_to_keep(self, job: str) -> Keeps:
        """One job's artifacts, cache and reports: its own where it has them, else the
        top level's (top-level artifacts in a file of several jobs may be meant for
        another job: ``artifacts_own`` False, so none is "missing")."""
        found = self.expanded().get(job)     # a matrix build's name is its job's and combination's
        spec = found[0] if found is not None else None
        if spec is None:
            return Keeps(self.artifacts, self.cache, self.reports)
        own = spec.artifacts is not None
        return Keeps(spec.artifacts if own else self.artifacts,
                     spec.cache if spec.cache is not None else self.cache,
                     spec.reports if spec.reports is not None else self.reports,
                     artifacts_own=own or len(self.jobs) == 1)

    def expanded(self) -> dict[str, tuple[JobDef, tuple]]:
        """Every build the jobs become, by name: (its job, its matrix combination), in file order."""
        return {expanded_name(j.name, combo): (j, combo) for j in self.jobs.values() for combo in j.combinations()}

    def job_list(self, branch: str | None = None, changed: tuple | None = None) -> list[dict]:
        """What a commit becomes: [{name, labels[, needs][, skip][, secrets]}], one per job and
        matrix combination; one default job without ``jobs``. ``needs`` are the
        expanded names of the needed builds; ``skip`` is why ``when`` keeps a
        job from running on ``branch`` with ``changed`` paths (None: not known)."""
        if not self.jobs:
            return [self._secrets_of({"name": DEFAULT_JOB, "labels": []}, ())]
        names = {j.name: [expanded_name(j.name, c) for c in j.combinations()] for j in self.jobs.values()}
        out = []
        for name, (job, combo) in self.expanded().items():
            entry: dict = {"name": name, "labels": list(matrix_labels(job.labels, combo))}
            if job.needs:
                entry["needs"] = [n for need in job.needs for n in names[need]]
            why = job.skip_reason(branch, changed)
            if why:
                entry["skip"] = why
            out.append(self._secrets_of(entry, job.secrets))
        return out

    def _secrets_of(self, job: dict, own: tuple) -> dict:
        """``secrets``: the top-level names and the job's own, only when there are some."""
        names = list(dict.fromkeys((*self.secrets, *own)))
        return {**job, "secrets": names} if names else job

    def uses_paths(self) -> bool:
        """Whether any job's ``when`` looks at the changed paths (worth reading them)."""
        return any(j.paths for j in self.jobs.values())

    def plan(self, job: str) -> tuple[tuple, float | None, dict]:
        """(steps, timeout, env) of one build, by its (expanded) job name; a matrix
        combination's env has its MATRIX_<AXIS>. Raises BuildFileError for a job the file lacks."""
        if not self.jobs:
            if job != DEFAULT_JOB:
                raise BuildFileError(0, f"there is no job {job!r}: the file defines no jobs")
            return self.steps, self.timeout, dict(self.env)
        builds = self.expanded()
        if job not in builds:
            if job == DEFAULT_JOB:
                raise BuildFileError(0, f"defines jobs ({', '.join(self.jobs)}) but this build "
                                        f"names none; trigger the commit again to build each job")
            raise BuildFileError(0, f"there is no job {job!r} (jobs: {', '.join(builds)})")
        spec, combo = builds[job]
        timeout = spec.timeout if spec.timeout is not None else self.timeout
        return spec.steps or self.steps, timeout, {**self.env, **spec.env, **matrix_env(combo)}


# One file checked at a time in a process. Daemons check files in worker
# threads; several costly ones at once would only share the CPU among
# themselves while outnumbering the event loop's thread for the GIL, so that
# it could not answer a ping for a second or more.
_ONE_AT_A_TIME = threading.Lock()


def parse(text: str) -> BuildFile:
    """Parse and check the file's text; raises BuildFileError naming the line."""
    if len(text) > MAX_SIZE:
        raise BuildFileError(0, f"is larger than {MAX_SIZE} bytes")
    with _ONE_AT_A_TIME:
        return _parse(text)


def _parse(text: str) -> BuildFile:
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:      # the composer recurses once per level
            raise BuildFileError(0, "nests too deeply to be read") from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise BuildFileError(mark.line + 1 if mark else 0,
                                 f"is not valid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise BuildFileError(0, f"is not valid YAML: {exc}") from None
        return _Checker(loader).file(root)
    finally:
        loader.dispose()


def tag(node: Any) -> str:
    return node.tag.rsplit(":", 1)[-1]


class _Checker:
    def __init__(self, loader: yaml.SafeLoader):
        self.loader = loader
        self.budget = MAX_VALUES
        self.job_nodes: dict = {}           # job name -> its keys' (key node, value node), for errors naming lines

    def spend(self, node: Any, count: int) -> None:
        """Count ``count`` values looked at under ``node``; refuse a file whose
        aliases expand past MAX_VALUES before the work gets out of hand."""
        self.budget -= count
        if self.budget < 0:
            raise self.fail(node, f"expands to more than {MAX_VALUES} values once its aliases (*name) "
                                  f"are followed; write it out or use fewer aliases")

    @staticmethod
    def fail(node: Any, problem: str) -> BuildFileError:
        return BuildFileError(node.start_mark.line + 1 if node is not None else 0, problem)

    def scalar(self, node: Any) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: Any, what: str, keys: tuple | None = None) -> dict:
        """{key: (key node, value node)}, checking keys are unique strings (and known)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping, got {self.kind(node)}")
        self.spend(node, len(node.value) + 1)
        out: dict = {}
        for knode, vnode in node.value:
            key = self.scalar(knode) if isinstance(knode, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise self.fail(knode, f"{what}: keys must be strings")
            if key in out:
                raise self.fail(knode, f"{what}: {key!r} appears twice")
            if keys is not None and key not in keys:
                raise self.fail(knode, f"{what}: unknown key {key!r} (known: {', '.join(keys)})")
            out[key] = (knode, vnode)
        return out

    @staticmethod
    def kind(node: Any) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return {"str": "a string", "int": "a number", "float": "a number", "bool": "a boolean",
                "null": "nothing"}.get(tag(node), tag(node))

    def string(self, node: Any, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or tag(node) != "str" or not self.scalar(node).strip():
            raise self.fail(node, f"{what} must be a non-empty string, got {self.kind(node)}")
        return self.scalar(node)

    def seconds(self, node: Any, what: str) -> float:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if tag(node) not in ("int", "float") or not 0 < value <= MAX_SECONDS:
            got = repr(value) if tag(node) in ("int", "float") else self.kind(node)
            raise self.fail(node, f"{what} must be a positive number of seconds, at most {MAX_SECONDS} "
                                  f"(a week), got {got}")
        return float(value)

    def names(self, node: Any, what: str) -> tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list, got {self.kind(node)}")
        self.spend(node, len(node.value) + 1)
        out = []
        for item in node.value:
            text = self.string(item, f"{what} item")
            if not patterns.is_name(text):
                raise self.fail(item, f"{what}: {text!r} must be 1-100 letters, digits or ._:@-")
            out.append(text)
        return tuple(out)

    def secret_names(self, node: Any, what: str) -> tuple:
        """A list of build secret names: each an environment variable's name."""
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, f"{what} must be a list of secret names, got {self.kind(node)}")
        self.spend(node, len(node.value) + 1)
        out = []
        for item in node.value:
            text = self.string(item, f"{what} item")
            if not patterns.is_env_name(text):
                raise self.fail(item, f"{what}: {text!r} is not a valid environment variable name")
            out.append(text)
        return tuple(dict.fromkeys(out))

    def env(self, node: Any, what: str) -> dict:
        out = {}
        for key, (knode, vnode) in self.mapping(node, what).items():
            if not patterns.is_env_name(key):
                raise self.fail(knode, f"{what}: {key!r} is not a valid environment variable name")
            if not isinstance(vnode, yaml.ScalarNode) or tag(vnode) == "null":
                raise self.fail(vnode, f"{what}.{key} must be a string or a number, got {self.kind(vnode)}")
            value = self.scalar(vnode)
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    def steps(self, node: Any, what: str) -> tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list of shell commands, got {self.kind(node)}")
        if not node.value:
            raise self.fail(node, f"{what} is empty")
        self.spend(node, len(node.value) + 1)
        out = []
        for number, item in enumerate(node.value, 1):
            where = f"{what}[{number}]"
            if isinstance(item, yaml.MappingNode):
                keys = self.mapping(item, where, STEP_KEYS)
                if "run" not in keys:
                    raise self.fail(item, f"{where} needs 'run': the shell command")
                out.append(Step(
                    run=self.string(keys["run"][1], f"{where}.run"),
                    name=self.string(keys["name"][1], f"{where}.name") if "name" in keys else "",
                    timeout=self.seconds(keys["timeout"][1], f"{where}.timeout") if "timeout" in keys else None,
                    env=self.env(keys["env"][1], f"{where}.env") if "env" in keys else {}))
            else:
                out.append(Step(run=self.string(item, f"{where} (a shell command or {{name, run, timeout, env}})")))
        return tuple(out)

    def artifacts(self, node: Any, what: str = "artifacts") -> tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list of glob patterns, got {self.kind(node)}")
        self.spend(node, len(node.value) + 1)
        if len(node.value) > MAX_GLOBS:
            raise self.fail(node, f"{what}: {len(node.value)} patterns, more than {MAX_GLOBS}")
        out = []
        for item in node.value:
            pattern = self.string(item, f"{what} item")
            if pattern.startswith("/") or ".." in pattern.split("/"):
                raise self.fail(item, f"{what}: {pattern!r} must stay inside the checkout "
                                      f"(relative, no '..')")
            out.append(pattern)
        return tuple(out)

    def cache(self, node: Any, what: str) -> CacheSpec:
        """``{paths, key}``: paths in the checkout or under ``~/``, key globs in the checkout."""
        keys = self.mapping(node, what, CACHE_KEYS)
        if "paths" not in keys:
            raise self.fail(node, f"{what} needs 'paths': what to keep, e.g. [.venv, ~/.cache/pip]")
        pnode = keys["paths"][1]
        if not isinstance(pnode, yaml.SequenceNode) or not pnode.value:
            raise self.fail(pnode, f"{what}.paths must be a non-empty list of paths, got {self.kind(pnode)}")
        self.spend(pnode, len(pnode.value) + 1)
        if len(pnode.value) > MAX_GLOBS:
            raise self.fail(pnode, f"{what}.paths: {len(pnode.value)} paths, more than {MAX_GLOBS}")
        paths = []
        for item in pnode.value:
            path = self.string(item, f"{what}.paths item").rstrip("/")
            parts = path.split("/")
            inner = parts[1:] if parts[0] == "~" else parts
            if (path.startswith("/") or not inner or any(p in ("", ".", "..") for p in inner)
                    or parts[0] == ".git" or "*" in path):
                raise self.fail(item, f"{what}.paths: {path!r} must be a path inside the checkout or under "
                                      f"~/ (relative, no '..', '.' or '*', not .git)")
            paths.append(path)
        key = self.artifacts(keys["key"][1], f"{what}.key") if "key" in keys else ()
        return CacheSpec(tuple(paths), key)

    def keeps(self, spec: dict, where: str) -> dict:
        """A job's (or the top level's) ``artifacts``, ``cache``, ``reports``, as JobDef fields."""
        out: dict = {}
        prefix = f"{where}." if where else ""
        if "artifacts" in spec:
            out["artifacts"] = self.artifacts(spec["artifacts"][1], f"{prefix}artifacts")
        if "cache" in spec:
            out["cache"] = self.cache(spec["cache"][1], f"{prefix}cache")
        if "reports" in spec:
            out["reports"] = self.artifacts(spec["reports"][1], f"{prefix}reports")
        return out

    def file(self, root: Any) -> BuildFile:
        if root is None:
            raise BuildFileError(1, "is empty: it needs 'steps' or 'jobs'")
        keys = self.mapping(root, "top level", TOP_KEYS)
        top_steps = self.steps(keys["steps"][1], "steps") if "steps" in keys else ()
        jobs: dict = {}
        if "jobs" in keys:
            jnode = keys["jobs"][1]
            declared = self.mapping(jnode, "jobs")
            if len(declared) > MAX_JOBS:
                raise self.fail(jnode, f"jobs: {len(declared)} jobs, more than the {MAX_JOBS} one commit "
                                       f"may have")
            builds = 0
            for name, (knode, vnode) in declared.items():
                jobs[name] = self.job(name, knode, vnode, top_steps)
                builds += len(jobs[name].combinations())
                if builds > MAX_JOBS:
                    where = self.job_nodes[name].get("matrix", (knode,))[0]
                    raise self.fail(where, f"jobs.{name}: its matrix takes the commit to {builds} builds, "
                                           f"more than the {MAX_JOBS} one commit may have")
            if not jobs:
                raise self.fail(jnode, "jobs is empty")
            self.graph(jobs)
        if not top_steps and not jobs:
            raise self.fail(root, "needs 'steps' (shell commands) or 'jobs'")
        return BuildFile(
            steps=top_steps,
            timeout=self.seconds(keys["timeout"][1], "timeout") if "timeout" in keys else None,
            env=self.env(keys["env"][1], "env") if "env" in keys else {},
            jobs=jobs, **self.keeps(keys, ""),
            secrets=self.secret_names(keys["secrets"][1], "secrets") if "secrets" in keys else ())

    def job(self, name: str, knode: Any, vnode: Any, top_steps: tuple) -> JobDef:
        if not patterns.is_name(name):
            raise self.fail(knode, f"job name {name!r} must be 1-100 letters, digits or ._:@-")
        where = f"jobs.{name}"
        spec = self.mapping(vnode, where, JOB_KEYS) if not (
            isinstance(vnode, yaml.ScalarNode) and tag(vnode) == "null") else {}
        self.job_nodes[name] = spec
        steps = self.steps(spec["steps"][1], f"{where}.steps") if "steps" in spec else ()
        if not steps and not top_steps:
            raise self.fail(vnode if spec else knode, f"{where} has no steps, and there are "
                                                      f"no top-level steps to run")
        matrix = self.matrix(spec["matrix"][1], f"{where}.matrix") if "matrix" in spec else ()
        labels = self.labels(spec["labels"][1], f"{where}.labels", matrix) if "labels" in spec else ()
        branches, paths = self.when(spec["when"][1], f"{where}.when") if "when" in spec else ((), ())
        return JobDef(
            name, labels, steps, self.env(spec["env"][1], f"{where}.env") if "env" in spec else {},
            self.seconds(spec["timeout"][1], f"{where}.timeout") if "timeout" in spec else None,
            matrix, self.names(spec["needs"][1], f"{where}.needs") if "needs" in spec else (), branches, paths,
            self.secret_names(spec["secrets"][1], f"{where}.secrets") if "secrets" in spec else (),
            **self.keeps(spec, where))

    def matrix(self, node: Any, what: str) -> tuple:
        """((axis, (value, ...)), ...): axes are names fit for MATRIX_<AXIS>, values plain words."""
        axes = self.mapping(node, what)
        if not axes:
            raise self.fail(node, f"{what} is empty")
        if len(axes) > MAX_AXES:
            raise self.fail(node, f"{what}: {len(axes)} axes, more than {MAX_AXES}")
        out = []
        for axis, (knode, vnode) in axes.items():
            if not patterns.is_env_name(axis) or len(axis) > 40:
                raise self.fail(knode, f"{what}: axis {axis!r} must be 1-40 letters, digits or _ "
                                       f"(not starting with a digit): it becomes MATRIX_{axis.upper()}")
            if not isinstance(vnode, yaml.SequenceNode) or not vnode.value:
                raise self.fail(vnode, f"{what}.{axis} must be a non-empty list of values, got {self.kind(vnode)}")
            self.spend(vnode, len(vnode.value) + 1)
            values: list = []
            for item in vnode.value:
                value = self.scalar(item) if isinstance(item, yaml.ScalarNode) else None
                text = str(value).lower() if isinstance(value, bool) else str(value)
                if tag(item) not in ("str", "int", "float", "bool") or not patterns.is_matrix_value(text):
                    raise self.fail(item, f"{what}.{axis}: {text if value is not None else self.kind(item)!r} "
                                          f"must be 1-50 letters, digits or ._:@+- (quote 3.10, or YAML "
                                          f"reads 3.1)")
                if text in values:
                    raise self.fail(item, f"{what}.{axis}: {text!r} appears twice")
                values.append(text)
            out.append((axis, tuple(values)))
        return tuple(out)

    def labels(self, node: Any, what: str, matrix: tuple) -> tuple:
        """A job's labels; with a matrix, ``${{ matrix.AXIS }}`` in them stands for the axis's value."""
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list, got {self.kind(node)}")
        self.spend(node, len(node.value) + 1)
        axes = dict(matrix)
        out = []
        for item in node.value:
            text = self.string(item, f"{what} item")
            for ref in MATRIX_REF.findall(text):
                if ref not in axes:
                    raise self.fail(item, f"{what}: {text!r} names matrix.{ref}, but the job's matrix "
                                          f"has {'axes ' + ', '.join(axes) if axes else 'no matrix'}")
            sample = MATRIX_REF.sub(lambda m: axes[m.group(1)][0], text)
            if not patterns.is_name(sample):
                raise self.fail(item, f"{what}: {text!r} must be 1-100 letters, digits or ._:@-")
            if any(not patterns.is_name(label) for combo in itertools.product(
                    *[[(a, v) for v in vs] for a, vs in matrix]) for label in matrix_labels((text,), combo)):
                raise self.fail(item, f"{what}: {text!r} is longer than 100 characters for some matrix values")
            out.append(text)
        return tuple(out)

    def when(self, node: Any, what: str) -> tuple[tuple, tuple]:
        keys = self.mapping(node, what, WHEN_KEYS)
        if not keys:
            raise self.fail(node, f"{what} is empty: give branches, paths or both")
        found = {}
        for key, (_, vnode) in keys.items():
            if not isinstance(vnode, yaml.SequenceNode) or not vnode.value:
                raise self.fail(vnode, f"{what}.{key} must be a non-empty list of patterns, got {self.kind(vnode)}")
            self.spend(vnode, len(vnode.value) + 1)
            found[key] = tuple(self.string(item, f"{what}.{key} item") for item in vnode.value)
        return found.get("branches", ()), found.get("paths", ())

    def graph(self, jobs: dict) -> None:
        """Every ``needs`` names a job of the file, and no job waits on itself, however far round."""
        for name, job in jobs.items():
            for index, need in enumerate(job.needs):
                if need not in jobs:
                    raise self.fail(self.job_nodes[name]["needs"][1].value[index],
                                    f"jobs.{name}.needs: there is no job {need!r} (jobs: {', '.join(jobs)})")
        done: set = set()
        for start in jobs:
            if start in done:
                continue
            path, on_path = [start], {start}
            stack = [(start, iter(jobs[start].needs))]
            while stack:
                name, rest = stack[-1]
                need = next(rest, None)
                if need is None:
                    stack.pop()
                    on_path.discard(path.pop())
                    done.add(name)
                elif need in on_path:
                    cycle = path[path.index(need):] + [need]
                    raise self.fail(self.job_nodes[need]["needs"][0], f"jobs.{need}.needs: a cycle: "
                                                                      f"{' -> '.join(cycle)}")
                elif need not in done:
                    path.append(need)
                    on_path.add(need)
                    stack.append((need, iter(jobs[need].needs)))
