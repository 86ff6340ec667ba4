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
      publish: {steps: [...], secrets: [PYPI_TOKEN]}
    secrets: [NAME]              # the dispatcher's build secrets every job gets, as variables

``secrets`` name build secrets the dispatcher holds (its ``secrets:``
section); a job gets those it names and the top-level ones, as environment
variables of its steps, never others.

A job without ``steps`` runs the top-level ``steps``. A file that does not
parse or fit raises BuildFileError, whose text names the line.
"""

from __future__ import annotations

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
JOB_KEYS = ("labels", "steps", "env", "timeout", "secrets")


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
class JobDef:
    name: str
    labels: tuple = ()
    steps: tuple = ()
    env: dict = field(default_factory=dict)
    timeout: float | None = None
    secrets: tuple = ()                 # names of the dispatcher's build secrets it asks for


@dataclass(frozen=True)
class BuildFile:
    steps: tuple = ()
    timeout: float | None = None
    env: dict = field(default_factory=dict)
    artifacts: tuple = ()
    jobs: dict = field(default_factory=dict)         # name -> JobDef, in file order
    secrets: tuple = ()                 # build secrets every job asks for

    def job_list(self) -> list[dict]:
        """What the observer sends with a commit: [{name, labels, secrets?}]; one
        default job without ``jobs``. ``secrets`` only when the job asks for some."""
        if not self.jobs:
            return [self._secrets_of({"name": DEFAULT_JOB, "labels": []}, ())]
        return [self._secrets_of({"name": j.name, "labels": list(j.labels)}, j.secrets) for j in self.jobs.values()]

    def _secrets_of(self, job: dict, own: tuple) -> dict:
        names = list(dict.fromkeys((*self.secrets, *own)))
        return {**job, "secrets": names} if names else job

    def plan(self, job: str) -> tuple[tuple, float | None, dict]:
        """(steps, timeout, env) of one job. Raises BuildFileError for a job the file lacks."""
        if not self.jobs:
            if job != DEFAULT_JOB:
                raise BuildFileError(0, f"there is no job {job!r}: the file defines no jobs")
            return self.steps, self.timeout, dict(self.env)
        if job not in self.jobs:
            if job == DEFAULT_JOB:
                raise BuildFileError(0, f"defines jobs ({', '.join(self.jobs)}) but this build "
                                        f"names none; trigger the commit again to build each job")
            raise BuildFileError(0, f"there is no job {job!r} (jobs: {', '.join(self.jobs)})")
        spec = self.jobs[job]
        timeout = spec.timeout if spec.timeout is not None else self.timeout
        return spec.steps or self.steps, timeout, {**self.env, **spec.env}


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

    def artifacts(self, node: Any) -> tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"artifacts must be a list of glob patterns, got {self.kind(node)}")
        self.spend(node, len(node.value) + 1)
        out = []
        for item in node.value:
            pattern = self.string(item, "artifacts item")
            if pattern.startswith("/") or ".." in pattern.split("/"):
                raise self.fail(item, f"artifacts: {pattern!r} must stay inside the checkout "
                                      f"(relative, no '..')")
            out.append(pattern)
        return tuple(out)

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
            for name, (knode, vnode) in declared.items():
                if not patterns.is_name(name):
                    raise self.fail(knode, f"job name {name!r} must be 1-100 letters, digits or ._:@-")
                where = f"jobs.{name}"
                spec = self.mapping(vnode, where, JOB_KEYS) if not (
                    isinstance(vnode, yaml.ScalarNode) and tag(vnode) == "null") else {}
                steps = self.steps(spec["steps"][1], f"{where}.steps") if "steps" in spec else ()
                if not steps and not top_steps:
                    raise self.fail(vnode if spec else knode, f"{where} has no steps, and there are "
                                                              f"no top-level steps to run")
                jobs[name] = JobDef(
                    name, self.names(spec["labels"][1], f"{where}.labels") if "labels" in spec else (),
                    steps, self.env(spec["env"][1], f"{where}.env") if "env" in spec else {},
                    self.seconds(spec["timeout"][1], f"{where}.timeout") if "timeout" in spec else None,
                    self.secret_names(spec["secrets"][1], f"{where}.secrets") if "secrets" in spec else ())
            if not jobs:
                raise self.fail(jnode, "jobs is empty")
        if not top_steps and not jobs:
            raise self.fail(root, "needs 'steps' (shell commands) or 'jobs'")
        return BuildFile(
            steps=top_steps,
            timeout=self.seconds(keys["timeout"][1], "timeout") if "timeout" in keys else None,
            env=self.env(keys["env"][1], "env") if "env" in keys else {},
            artifacts=self.artifacts(keys["artifacts"][1]) if "artifacts" in keys else (),
            jobs=jobs,
            secrets=self.secret_names(keys["secrets"][1], "secrets") if "secrets" in keys else ())
