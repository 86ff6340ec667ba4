"""Configuration: one YAML file with a section per daemon, loaded once into
frozen dataclasses and passed down.

Precedence: command-line flag > ``TINYCI_<SECTION>_<KEY>`` environment
variable > file > built-in default. Every default works on one machine with
no file at all. An unknown key or a wrong type is a ConfigError naming the
file (or variable) and the key, raised at start-up.

Two sections are mappings the operator names the keys of: ``pipelines``
(repository -> its build definition, ``.ci.yaml``'s schema, plus
``override``) and ``secrets`` (name -> value, ``{value|file, branches}``,
or ``<NAME>_file: path``; ``TINYCI_SECRETS_<NAME>`` in the environment).
Here their shape is checked; the definitions (against ``buildfile``) and the
secret files are ``settings.resolve``'s.

A leaf: this module only parses and checks values. Reading the secret files
it names, building TLS contexts and checking values against the wire table
are ``settings.resolve``'s job, done once at start-up.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)
if TYPE_CHECKING:
    from typing import Any, Mapping

from .limits import Limits


class ConfigError(Exception):
    """A configuration problem, worded for the person who has to fix it."""


# Each class has a docstring: without one @dataclass makes one from
# inspect.signature, a cost every tool pays at each start.
@dataclass(frozen=True)
class DispatcherConfig:
    """The ``dispatcher`` section: where it listens and keeps its data, runners' liveness, the caps."""

    host: str = "127.0.0.1"
    port: int = 8888
    data_dir: str = ".tinyci/dispatcher"
    heartbeat_interval: float = 1.0
    heartbeat_misses: int = 3
    max_attempts: int = 3
    forget_dead_after: float = 86400.0      # seconds a dead runner stays in status; 0: for ever
    max_log_bytes: int = 16 << 20
    max_artifact_bytes: int = 100 << 20     # per build
    min_free_bytes: int = 32 << 20          # kept free on the data dir's disk for the database
    supersede: list = field(default_factory=list)   # branch patterns
    repos: list = field(default_factory=list)   # repositories it builds; empty: any


@dataclass(frozen=True)
class RetentionConfig:
    """The ``retention`` section: which finished builds the dispatcher deletes, and how often."""

    days: float = 0.0             # finished builds older than this are deleted; 0: kept forever
    per_branch: int = 0           # finished builds kept per repository, branch and job; 0: all
    interval: float = 3600.0      # seconds between sweeps


@dataclass(frozen=True)
class ObserverConfig:
    """The ``observer`` section: the clone it watches, which branches and commits, how often."""

    host: str = "127.0.0.1"
    port: int = 8887
    repo: str = ""
    repo_url: str = ""            # what runners clone; default: the repo's absolute path
    dispatcher: str = "127.0.0.1:8888"
    poll_interval: float = 1.0
    branches: list = field(default_factory=lambda: ["*"])
    fetch: bool = False
    remote: str = "origin"
    fetch_interval: float = 0.0   # seconds between fetches when no poke comes; 0: before every look
    build: str = "all"            # all | first-parent | heads: which new commits of a branch to report
    state_dir: str = ".tinyci/observer"


@dataclass(frozen=True)
class RunnerConfig:
    """The ``runner`` section: its name, labels, slots, workdir, and what it keeps there."""

    host: str = "127.0.0.1"
    port: int = 8889
    dispatcher: str = "127.0.0.1:8888"
    name: str = ""                # default: <host name>-<n>, the lowest n whose workdir is free
    labels: list = field(default_factory=list)
    slots: int = 1
    workdir: str = ""             # default: .tinyci/runners/<name>
    kill_grace: float = 5.0
    clone_days: float = 30.0      # delete a slot's working clone no build used for this long; 0: never
    cache_bytes: int = 2 << 30    # the build cache (.ci.yaml `cache`) under the workdir, LRU-evicted; 0: none


@dataclass(frozen=True)
class BuildConfig:
    """The ``build`` section: the steps, time limit and environment of a commit without ``.ci.yaml``."""

    steps: list = field(default_factory=list)   # empty: pytest when the repo has tests
    timeout: float = 600.0
    env: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NotifyConfig:
    """The ``notify`` section: commands the dispatcher runs when a build ends."""

    on_finish: list = field(default_factory=list)
    timeout: float = 30.0


@dataclass(frozen=True)
class AuthConfig:
    """The ``auth`` section: the secrets each role proves itself with."""

    secret: str = ""              # shared: used by every role without a secret of its own
    secret_file: str = ""
    # the dispatcher's: each runner's own credential, name -> secret (and/or a YAML file of them)
    runners: dict = field(default_factory=dict)
    runners_file: str = ""
    # a runner's own credential (else `secret`); on the dispatcher: for runners not in `runners`
    runner_secret: str = ""
    runner_secret_file: str = ""
    observer_secret: str = ""
    observer_secret_file: str = ""
    operator_secret: str = ""
    operator_secret_file: str = ""
    reader_secret: str = ""
    reader_secret_file: str = ""


@dataclass(frozen=True)
class TLSConfig:
    """The ``tls`` section: certificate, key and CA paths (``tls`` makes the contexts)."""

    cert: str = ""                # this daemon's certificate (PEM); servers need it
    key: str = ""                 # its private key (PEM); empty: inside `cert`
    ca: str = ""                  # CA that signed the peers' certificates


@dataclass(frozen=True)
class WebConfig:
    """The ``web`` section: the web page's address, users, token, actions and forges' webhooks."""

    host: str = "127.0.0.1"
    port: int = 8080
    dispatcher: str = ""          # HOST:PORT; empty: dispatcher.host and port
    users: dict = field(default_factory=dict)   # name -> scrypt hash (tinyci web --hash-password)
    token: str = ""               # a bearer token for scripts (API, metrics)
    token_file: str = ""
    session_hours: float = 12.0
    actions: bool = False         # rebuild, cancel, trigger for logged-in users (needs the operator secret)
    # push webhooks (POST /hooks/<forge>): each forge's shared secret; empty: that forge's hook is off
    github_secret: str = ""       # X-Hub-Signature-256, HMAC-SHA256 of the body
    github_secret_file: str = ""
    gitea_secret: str = ""        # X-Gitea-Signature, HMAC-SHA256 of the body (hex)
    gitea_secret_file: str = ""
    gitlab_token: str = ""        # X-Gitlab-Token, compared as it is
    gitlab_token_file: str = ""
    observer: str = ""            # HOST:PORT the hooks poke; empty: observer.host and port


@dataclass(frozen=True)
class ScheduleConfig:
    """Builds the dispatcher queues at set times (ci/schedule.py checks the entries)."""
    timezone: str = ""            # IANA name (zoneinfo); empty: this machine's local zone
    builds: list = field(default_factory=list)      # [{cron, branch, repo?, jobs?}]


# Keys whose lists hold mappings, not strings (checked by their own module)
STRUCTURED = {("schedule", "builds")}

# Sections whose keys the operator names (a repository, a secret): plain mappings on Config
FREE = ("pipelines", "secrets")
PIPELINE_KEYS = ("override", "file")        # besides the definition's own (buildfile.TOP_KEYS)
SECRET_KEYS = ("value", "file", "branches")
# A shorter secret would be masked wherever its letters happen to appear in a log
MIN_SECRET_CHARS = 8
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


@dataclass(frozen=True)
class Config:
    """The whole configuration: a section each, the free sections, and where each key came from."""

    dispatcher: DispatcherConfig = field(default_factory=DispatcherConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    net: Limits = field(default_factory=Limits)     # the transport's bounds, as they are
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    web: WebConfig = field(default_factory=WebConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # repository (as the observer reports it) -> {override?, file? | the definition's keys}
    pipelines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)
    # build secret name -> {value | file, branches?}; never printed (repr) nor compared
    secrets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    source: str = "built-in defaults"
    # where each key that is not a default came from (a file, "environment",
    # "command line"), for errors found after loading; not part of equality
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def origin(self, section: str, key: str) -> str:
        """Where ``section.key`` was set, for an error message naming it."""
        return self.origins.get(f"{section}.{key}", "built-in defaults")


SECTIONS = {f.name: f.default_factory for f in fields(Config) if f.name not in ("source", "origins", *FREE)}

# Keys that are gone, with what replaces them: a configuration that still sets one is refused
RETIRED = {
    ("auth", "dispatcher_secret"): "the dispatcher now proves itself to each runner with that runner's own "
                                   "secret (auth.runners on the dispatcher, auth.runner_secret on the runner)",
}
RETIRED[("auth", "dispatcher_secret_file")] = RETIRED[("auth", "dispatcher_secret")]

# Bounds checked after types: (section, key) -> (test, what it must be)
_BOUNDS = {
    ("dispatcher", "port"): (lambda v: 0 <= v <= 65535, "a port 0-65535"),
    ("observer", "port"): (lambda v: 0 <= v <= 65535, "a port 0-65535"),
    ("runner", "port"): (lambda v: 0 <= v <= 65535, "a port 0-65535"),
    ("web", "port"): (lambda v: 0 <= v <= 65535, "a port 0-65535"),
    ("web", "session_hours"): (lambda v: v > 0, "greater than 0"),
    ("dispatcher", "heartbeat_interval"): (lambda v: v > 0, "greater than 0"),
    ("dispatcher", "heartbeat_misses"): (lambda v: v >= 1, "at least 1"),
    ("dispatcher", "max_attempts"): (lambda v: v >= 1, "at least 1"),
    ("dispatcher", "forget_dead_after"): (lambda v: v >= 0, "0 (never) or more seconds"),
    ("dispatcher", "max_log_bytes"): (lambda v: v >= 1024, "at least 1024"),
    ("dispatcher", "max_artifact_bytes"): (lambda v: v >= 0, "0 or more"),
    ("dispatcher", "min_free_bytes"): (lambda v: v >= 0, "0 or more"),
    ("retention", "days"): (lambda v: 0 <= v <= 1e6, "0 (keep forever) or more"),
    ("retention", "per_branch"): (lambda v: v >= 0, "0 (keep all) or more"),
    ("retention", "interval"): (lambda v: v >= 1, "at least 1 (seconds)"),
    ("notify", "timeout"): (lambda v: v > 0, "greater than 0"),
    ("observer", "poll_interval"): (lambda v: v > 0, "greater than 0"),
    ("observer", "fetch_interval"): (lambda v: v >= 0, "0 (fetch before every look) or more seconds"),
    ("observer", "build"): (lambda v: v in ("all", "first-parent", "heads"),
                            "one of all, first-parent, heads"),
    ("runner", "slots"): (lambda v: 1 <= v <= 256, "between 1 and 256"),
    ("runner", "kill_grace"): (lambda v: v >= 0, "0 or more"),
    ("runner", "clone_days"): (lambda v: v >= 0, "0 or more (days; 0 keeps the clones forever)"),
    ("runner", "cache_bytes"): (lambda v: v >= 0, "0 (no build cache) or more bytes"),
    ("build", "timeout"): (lambda v: 0 < v <= 10**9, "greater than 0 (seconds)"),
    # build.steps and build.env are checked against the wire table by settings.resolve
    ("net", "max_frame"): (lambda v: 1024 <= v <= 1 << 30, "between 1024 and 1073741824"),
    ("net", "max_bulk"): (lambda v: 1024 <= v <= 1 << 30, "between 1024 and 1073741824"),
    ("net", "max_connections"): (lambda v: v >= 1, "at least 1"),
    ("net", "max_handshakes"): (lambda v: v >= 1, "at least 1"),
    ("net", "max_per_peer"): (lambda v: v >= 1, "at least 1"),
}


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Build the configuration; ``path`` None means ``TINYCI_CONFIG`` or no file."""
    env = os.environ if env is None else env
    path = path or env.get("TINYCI_CONFIG") or None
    values: dict[str, dict[str, Any]] = {name: {} for name in (*SECTIONS, *FREE)}
    source = "built-in defaults"
    if path is not None:
        source = str(path)
        _merge(values, _read_file(Path(path)), source)
    _merge(values, _from_env(env), "environment")
    for section, keys in (overrides or {}).items():
        for key, value in keys.items():
            if value is not None:
                values[section][key] = (value, "command line")
    built = {}
    for section, factory in SECTIONS.items():
        base = factory()
        changes = {key: _check(section, key, value, origin, base) for key, (value, origin) in values[section].items()}
        built[section] = replace(base, **changes)
    built["pipelines"] = {repo: _pipeline(repo, value, origin) for repo, (value, origin) in values["pipelines"].items()}
    built["secrets"] = _secrets(values["secrets"])
    origins = {f"{section}.{key}": origin for section, keys in values.items() for key, (_, origin) in keys.items()}
    return Config(**built, source=source, origins=origins)


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    import yaml         # only with a file: without one a tool starts without it
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return {} if data is None else data


def _merge(values: dict, data: Any, origin: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, keys in data.items():
        if section not in SECTIONS and section not in FREE:
            raise ConfigError(f"{origin}: unknown section {section!r} (known: {', '.join([*SECTIONS, *FREE])})")
        if keys is None:
            continue
        if section in FREE:
            if not isinstance(keys, dict) or not all(isinstance(k, str) and k for k in keys):
                raise ConfigError(f"{origin}: section {section!r} must be a mapping of "
                                  f"{'repositories' if section == 'pipelines' else 'secret names'} to entries")
            values[section].update((key, (value, origin)) for key, value in keys.items())
            continue
        if section == "schedule" and isinstance(keys, list):
            keys = {"builds": keys}         # `schedule:` given as the list of entries itself
        if not isinstance(keys, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of keys")
        known = {f.name for f in fields(SECTIONS[section]())}
        for key, value in keys.items():
            _refuse_retired(section, key, origin)
            if key not in known:
                raise ConfigError(f"{origin}: unknown key {section}.{key} (known: {', '.join(sorted(known))})")
            values[section][key] = (value, origin)


def _from_env(env: Mapping[str, str]) -> dict:
    """TINYCI_<SECTION>_<KEY> variables, parsed by the type of the key's default."""
    data: dict[str, dict[str, Any]] = {}
    for name, text in env.items():
        if name.startswith("TINYCI_SECRETS_") and len(name) > len("TINYCI_SECRETS_"):
            data.setdefault("secrets", {})[name[len("TINYCI_SECRETS_"):]] = text
            continue
        for section, factory in SECTIONS.items():
            prefix = f"TINYCI_{section.upper()}_"
            if not name.startswith(prefix):
                continue
            key = name[len(prefix):].lower()
            _refuse_retired(section, key, f"environment variable {name}")
            hints = _kinds(factory)
            if key not in hints:
                raise ConfigError(f"environment variable {name}: no key {section}.{key} "
                                  f"(known: {', '.join(sorted(hints))})")
            kind = dict if (section, key) in STRUCTURED else hints[key]     # a JSON value, like build.env
            data.setdefault(section, {})[key] = _parse_env(name, text, kind, _is_secret(section, key))
    return data


def _refuse_retired(section: str, key: str, origin: str) -> None:
    why = RETIRED.get((section, key))
    if why:
        raise ConfigError(f"{origin}: {section}.{key} is no longer used: {why}; remove it")


def _parse_env(name: str, text: str, kind: Any, hidden: bool = False) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is list:
            return [part.strip() for part in text.split(",") if part.strip()]
        if kind is dict:
            return json.loads(text)
        return text
    except ValueError:
        shown = "(value hidden)" if hidden else repr(text)
        raise ConfigError(f"environment variable {name}: {shown} is not a valid "
                          f"{'JSON mapping' if kind is dict else getattr(kind, '__name__', kind)}") from None


WEB_SECRETS = frozenset({"token", "users", "github_secret", "gitea_secret", "gitlab_token"})


def _is_secret(section: str, key: str) -> bool:
    return (section == "auth" and not key.endswith("_file")) or (section == "web" and key in WEB_SECRETS)


# The kinds a section's key may have, by their annotations' names (which is all
# ``from __future__ import annotations`` leaves of them)
_KINDS = {kind.__name__: kind for kind in (bool, int, float, str, list, dict)}


@functools.cache
def _kinds(section: type) -> dict[str, type]:
    """Each key of a section with its kind: ``typing.get_type_hints`` for plain
    builtins, without importing typing at every tool's start."""
    return {f.name: _KINDS[f.type] for f in fields(section)}


def _check(section: str, key: str, value: Any, origin: str, base: Any) -> Any:
    kind = _kinds(type(base))[key]
    where = f"{origin}: {section}.{key}"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if ok and kind is list and (section, key) not in STRUCTURED:
        ok = all(isinstance(item, str) for item in value)
    if ok and kind is dict:
        ok = all(isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in value.items())
        value = {k: str(v) for k, v in value.items()} if ok else value
    if not ok:
        expected = {list: "a list of strings", dict: "a mapping of strings", int: "an integer",
                    float: "a number", bool: "true or false", str: "a string"}[kind]
        shown = "(value hidden)" if _is_secret(section, key) else f"{value!r:.60}"
        raise ConfigError(f"{where} must be {expected}, got {type(value).__name__} {shown}")
    bound = _BOUNDS.get((section, key))
    if bound and not bound[0](value):
        raise ConfigError(f"{where} must be {bound[1]}, got {value!r}")
    return value


# ------------------------------------------------------------ the free sections

def _pipeline(repo: str, value: Any, origin: str) -> dict:
    """A repository's server-side definition, its shape only: ``file`` (a
    ``.ci.yaml`` kept on the server) or the definition inline, and ``override``."""
    where = f"{origin}: pipelines.{repo}"
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where} must be a build definition (steps or jobs, as in .ci.yaml) or "
                          f"{{file: path}}, got {type(value).__name__}")
    if not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{where}: keys must be strings")
    if not isinstance(value.get("override", False), bool):
        raise ConfigError(f"{where}.override must be true or false, got {value['override']!r:.60}")
    if "file" in value:
        if not isinstance(value["file"], str) or not value["file"].strip():
            raise ConfigError(f"{where}.file must be the path of a .ci.yaml-style file")
        extra = sorted(set(value) - set(PIPELINE_KEYS))
        if extra:
            raise ConfigError(f"{where}: {extra[0]!r} next to 'file': give the definition inline or in "
                              f"the file, not both")
    elif set(value) <= set(PIPELINE_KEYS):
        raise ConfigError(f"{where} has no definition: give steps or jobs (as in .ci.yaml), or file")
    return dict(value)


def _secrets(entries: Mapping[str, tuple[Any, str]]) -> dict[str, dict]:
    """name -> {value | file, branches}: ``NAME: value``, ``NAME: {value|file, branches}``
    or ``NAME_file: path``. Errors name the key, never the value."""
    out: dict[str, dict] = {}
    where_of: dict[str, str] = {}
    for key, (value, origin) in entries.items():
        where = f"{origin}: secrets.{key}"
        name = key
        if key.endswith("_file") and isinstance(value, str):
            name, value = key[:-len("_file")], {"file": value}
        elif isinstance(value, (str, int)) and not isinstance(value, bool):
            value = {"value": str(value)}
        if not _ENV_NAME.fullmatch(name) or name.upper().startswith(("CI_", "TINYCI_")) or name == "CI":
            raise ConfigError(f"{where}: {name[:100]!r} must be an environment variable name (letters, "
                              f"digits, _), not CI or CI_*/TINYCI_*: steps get it as that variable")
        if name in out:
            raise ConfigError(f"{where}: secret {name!r} is also set at {where_of[name]}; set it once")
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a value, {{value|file, branches}}, or {name}_file: path, "
                              f"got {type(value).__name__}")
        unknown = sorted(set(value) - set(SECRET_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(SECRET_KEYS)})")
        if ("value" in value) == ("file" in value):
            raise ConfigError(f"{where} needs one of 'value' or 'file'")
        if "file" in value and (not isinstance(value["file"], str) or not value["file"].strip()):
            raise ConfigError(f"{where}.file must be a path")
        if "value" in value:
            if not isinstance(value["value"], (str, int)) or isinstance(value["value"], bool):
                raise ConfigError(f"{where}.value must be a string (value hidden)")
            if len(str(value["value"]).strip()) < MIN_SECRET_CHARS:
                raise ConfigError(f"{where} is shorter than {MIN_SECRET_CHARS} characters: every place "
                                  f"those characters appear in a log would be masked; use a longer secret")
        branches = value.get("branches", ["*"])
        if not isinstance(branches, list) or not branches or not all(isinstance(b, str) and b for b in branches):
            raise ConfigError(f"{where}.branches must be a non-empty list of branch patterns")
        out[name] = {**value, "branches": list(branches)}
        where_of[name] = where
    return out
