"""The configuration resolved once, at start-up, into what the daemons and
tools use: every role's secret read from its file, the runners' own
credentials, the connection limits, the TLS contexts made, and the build
defaults checked against the wire table. Built by ``resolve`` and handed
down; nothing below reads a secret file or builds a context again.

Keys (``Settings.key``): a runner proves itself, and the dispatcher proves
itself to that runner, with the runner's own credential (``auth.runners`` /
``auth.runners_file`` on the dispatcher, ``auth.runner_secret`` on the
runner), else the shared runner secret (``auth.runner_secret``, else
``auth.secret``: the one-secret setup of `tinyci up`). Every other role
uses ``auth.<role>_secret``, else ``auth.secret``. Once any secret is set,
every role a daemon accepts or a tool uses must have one: ``resolve``
refuses to start otherwise, naming the open roles.

The dispatcher's build definitions (``pipelines``: each repository's checked
by ``buildfile`` into a ``Pipeline``, errors naming the file and key) and its
build secrets (``secrets``: each value read once, files too, into a
``BuildSecret`` with the branches that may have it) are resolved here as
well, by the dispatcher only (``build_side``): a runner or a tool never
reads them.

It sits above both ``config`` (plain values) and ``protocol``/``tls`` (what
the values must satisfy), which is why those checks live here and not in
the configuration's own loader.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields
from pathlib import Path

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)
if TYPE_CHECKING:
    from typing import Iterable, Mapping

from . import patterns, protocol, tls
from .config import MIN_SECRET_CHARS, AuthConfig, Config, ConfigError
from .limits import Limits

# What only the dispatcher (its pipelines: buildfile, yaml), a runners file
# (yaml) or TLS (ssl) needs is imported where it is used: a tool resolves its
# settings at every start and needs none of it.
if TYPE_CHECKING:
    import ssl

    from . import buildfile

# The roles that have secrets of their own: the dispatcher proves itself with each runner's
ROLES = tuple(role for role in protocol.ROLES if role != protocol.DISPATCHER)


@dataclass(frozen=True)
class Pipeline:
    """A repository's build definition kept on the dispatcher (``pipelines.<repo>``)."""

    repo: str
    definition: buildfile.BuildFile
    text: str                   # the definition as .ci.yaml text: what a `run` carries to the runner
    override: bool = False      # True: it wins over the commit's own .ci.yaml

    @property
    def jobs(self) -> list[dict]:
        return self.definition.job_list()


@dataclass(frozen=True)
class BuildSecret:
    """A build secret (``secrets.<name>``): its value, and the branches that may have it."""

    name: str
    value: str = field(repr=False)
    branches: tuple = ("*",)

    def allows(self, branch: str) -> bool:
        return any(fnmatch.fnmatchcase(branch, pattern) for pattern in self.branches)


@dataclass(frozen=True)
class Settings:
    """The configuration resolved once at start-up (``resolve``): secrets, limits, TLS, pipelines."""

    config: Config
    secrets: Mapping[str, str]          # role -> the secret it proves itself with ("" = none)
    limits: Limits
    server_tls: ssl.SSLContext | None   # None: listen without TLS
    client_tls: ssl.SSLContext | None   # None: connect without TLS
    runners: Mapping[str, str] = field(default_factory=dict, repr=False)    # runner name -> its own secret
    secured: bool = False               # some secret is set: a key that is empty refuses, never opens
    pipelines: Mapping[str, Pipeline] = field(default_factory=dict, repr=False)    # repo -> its definition
    build_secrets: Mapping[str, BuildSecret] = field(default_factory=dict, repr=False)

    def pipeline(self, repo: str) -> Pipeline | None:
        return self.pipelines.get(repo)

    def secret_problem(self, name: str, branch: str) -> str:
        """Why a build of ``branch`` cannot have the secret ``name``; "" when it can."""
        secret = self.build_secrets.get(name)
        if secret is None:
            return f"secret {name} is not defined on the dispatcher (secrets.{name})"
        if not secret.allows(branch):
            return (f"secret {name} is not allowed on branch {branch} "
                    f"(secrets.{name}.branches: {', '.join(secret.branches)})")
        return ""

    def secrets_for(self, names: Iterable[str], branch: str) -> dict[str, str]:
        """The values of the secrets ``names`` that a build of ``branch`` may have."""
        return {name: self.build_secrets[name].value for name in names if not self.secret_problem(name, branch)}

    def secret(self, role: str) -> str:
        """The secret ``role`` authenticates with (role runner: the shared runner secret)."""
        return self.secrets[role]

    def runner_key(self, name: str) -> str | None:
        """The key of runner ``name``: what it proves itself with, and what the
        dispatcher proves itself to it with. Its own credential, else the shared
        runner secret; "" when no secret is set at all (loopback, unauthenticated);
        None when secrets are set but this runner has none (refuse it)."""
        key = self.runners.get(name) or self.secrets.get(protocol.RUNNER, "")
        return key if key or not self.secured else None

    def key(self, role: str, id: str = "") -> str | None:
        """The key a server checks a client of ``role`` (and ``id``) with; None: refuse it."""
        if role == protocol.RUNNER:
            return self.runner_key(id)
        key = self.secrets.get(role, "")
        return key if key or not self.secured else None

    def is_open(self, role: str) -> bool:
        """True when ``role`` connects without a secret: only when none is set at
        all, since ``resolve`` refuses a configuration that leaves a role open."""
        return not self.secured


def resolve(config: Config, *, roles: Iterable[str] = ROLES, listens: bool = True,
            build_side: bool | None = None) -> Settings:
    """Read and build everything the configuration names. Raises ConfigError
    naming the key and file at fault (a secret file that cannot be read, a
    runners file that is not a mapping of names to secrets, a certificate that
    does not load, build steps the runner would refuse, a role left without a
    secret while another has one).

    ``roles``: those the program accepts or uses (a daemon's and a tool's
    differ); only their secrets are read, and each must have one once any
    secret is set. A tool passes its own and ``listens=False``: it builds no
    server context, so a daemon-only file it cannot see (another role's
    secret, the runners file, a server key) does not stop it.

    ``build_side``: read the pipelines and build secrets (default: for the
    program that accepts both runners and observers, the dispatcher)."""
    _check_build(config)
    roles = [role for role in roles if role != protocol.DISPATCHER]
    secrets = _secrets(config.auth, roles)
    runners = _runners(config) if protocol.RUNNER in roles else {}
    secured = _check_roles(config, roles, secrets, runners)
    if build_side is None:
        build_side = listens and protocol.RUNNER in roles and protocol.OBSERVER in roles
    return Settings(config=config, secrets=secrets, limits=config.net,
                    server_tls=_tls(config, listening=True) if listens else None,
                    client_tls=_tls(config, listening=False), runners=runners, secured=secured,
                    pipelines=_pipelines(config) if build_side else {},
                    build_secrets=_build_secrets(config) if build_side else {})


def _secrets(auth: AuthConfig, roles: Iterable[str]) -> dict[str, str]:
    """Each role's own secret (``<role>_secret_file``, then ``<role>_secret``), else the shared one."""
    shared = _read_secret(auth, "secret")       # read once, not once per role
    return {role: _read_secret(auth, f"{role}_secret") or shared for role in roles}


def _read_secret(auth: AuthConfig, key: str) -> str:
    """``auth.<key>_file``'s content (stripped) when set, else ``auth.<key>``.
    Errors name the key and the file, never the secret."""
    path_text = getattr(auth, f"{key}_file")
    if path_text:
        return _read_file(f"auth.{key}_file", path_text).strip()
    return getattr(auth, key)


def _read_file(key: str, path_text: str) -> str:
    path = Path(path_text).expanduser()
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not a text file"
        raise ConfigError(f"{key}: cannot read {path}: {why}") from None


def _runners(config: Config) -> dict[str, str]:
    """The runners' own credentials: ``auth.runners`` and the file
    ``auth.runners_file`` (a YAML mapping of runner names to secrets). A name
    in both is refused rather than one silently winning."""
    auth = config.auth
    runners = _credentials(f"{config.origin('auth', 'runners')}: auth.runners", auth.runners)
    if auth.runners_file:
        import yaml
        path = Path(auth.runners_file).expanduser()
        text = _read_file("auth.runners_file", auth.runners_file)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"auth.runners_file: {path}{where} is not valid YAML") from None
        from_file = _credentials(f"auth.runners_file {path}", {} if data is None else data)
        both = sorted(set(runners) & set(from_file))
        if both:
            raise ConfigError(f"auth.runners_file {path}: runner {both[0]!r} is also in auth.runners "
                              f"({config.origin('auth', 'runners')}); keep each runner in one place")
        runners.update(from_file)
    return runners


def _credentials(where: str, data: object) -> dict[str, str]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of runner names to secrets")
    found = {}
    for name, secret in data.items():
        if not patterns.is_name(name):
            raise ConfigError(f"{where}: entry {str(name)[:100]!r} is not a runner {patterns.NAME_RULE}")
        if isinstance(secret, bool) or not isinstance(secret, (str, int)) or not str(secret).strip():
            raise ConfigError(f"{where}: entry {name!r}: the secret must be a non-empty string")
        found[name] = str(secret).strip()
    return found


def _check_roles(config: Config, roles: list[str], secrets: Mapping[str, str], runners: Mapping) -> bool:
    """True when any secret is set; then every one of ``roles`` must have one
    (runners: the shared runner secret or their own credentials), or a
    ConfigError names the open ones. Whether a secret is set is read from
    the keys, not the files: a tool does not read the files of other roles."""
    auth = config.auth
    set_keys = [f.name for f in fields(AuthConfig) if getattr(auth, f.name)]
    if not set_keys:
        return False
    open_roles = sorted(role for role in roles if not secrets[role] and not (role == protocol.RUNNER and runners))
    if open_roles:
        raise ConfigError(
            f"{config.origin('auth', set_keys[0])}: auth.{set_keys[0]} is set, but role(s) "
            f"{', '.join(open_roles)} have no secret: once any secret is set, every role must have one "
            f"(auth.secret for all, or auth.<role>_secret for each)")
    return True


def _tls(config: Config, listening: bool) -> ssl.SSLContext | None:
    paths = config.tls
    make = tls.server_context if listening else tls.client_context
    try:
        return make(paths.cert, paths.key, paths.ca)
    except tls.TLSError as exc:
        raise ConfigError(str(exc)) from None


# What goes into every `run` message must pass the wire table, or the runner
# would refuse each build: (key of the build section, its kind, a hint).
_WIRE_CHECKED = (("steps", protocol.STEPS, ""),
                 ("env", protocol.ENV, " (names of letters, digits and _)"))


def _check_build(config: Config) -> None:
    for key, kind, hint in _WIRE_CHECKED:
        value = getattr(config.build, key)
        if not kind.check(value):
            raise ConfigError(f"{config.origin('build', key)}: build.{key} must be a {kind.name}{hint}, "
                              f"got {value!r:.200}")


# ------------------------------------------------------------ pipelines and build secrets

def _pipelines(config: Config) -> dict[str, Pipeline]:
    """Each ``pipelines.<repo>`` checked as a ``.ci.yaml`` would be; errors name the key."""
    import yaml

    from . import buildfile
    out = {}
    for repo, entry in config.pipelines.items():
        where = f"{config.origin('pipelines', repo)}: pipelines.{repo}"
        if "file" in entry:
            text = _read_file(f"{where}.file", entry["file"])
            where = f"{where}.file {Path(entry['file']).expanduser()}"
        else:
            text = yaml.safe_dump({k: v for k, v in entry.items() if k != "override"}, sort_keys=False,
                                  allow_unicode=True)
        try:
            definition = buildfile.parse(text)
        except buildfile.BuildFileError as exc:
            # an inline definition's line numbers would be those of our own dump: the key path names it
            line = f" line {exc.line}" if exc.line and "file" in entry else ""
            raise ConfigError(f"{where}{line}: {exc.problem}") from None
        out[repo] = Pipeline(repo, definition, text, bool(entry.get("override", False)))
    return out


def _build_secrets(config: Config) -> dict[str, BuildSecret]:
    """Each ``secrets.<name>``'s value, read once (a file's content stripped)."""
    out = {}
    for name, entry in config.secrets.items():
        where = f"{config.origin('secrets', name)}: secrets.{name}"
        if "file" in entry:
            value = _read_file(f"{where}.file", entry["file"]).strip()
            if len(value) < MIN_SECRET_CHARS:
                raise ConfigError(f"{where}.file {Path(entry['file']).expanduser()} holds fewer than "
                                  f"{MIN_SECRET_CHARS} characters: every place those characters appear in "
                                  f"a log would be masked; use a longer secret")
        else:
            value = str(entry["value"])
        if len(value) > 16384 or "\0" in value:
            raise ConfigError(f"{where}: longer than 16384 characters or holds a NUL: an environment "
                              f"variable cannot carry it")
        out[name] = BuildSecret(name, value, tuple(entry["branches"]))
    return out
