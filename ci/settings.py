"""The configuration resolved once, at start-up, into what the daemons and
tools use: every role's secret read from its file, the connection limits,
the TLS contexts made, and the build defaults checked against the wire
table. Built by ``resolve`` and handed down; nothing below reads a secret
file or builds a context again.

It sits above both ``config`` (plain values) and ``protocol``/``tls`` (what
the values must satisfy), which is why those checks live here and not in
the configuration's own loader.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from . import protocol, tls
from .config import AuthConfig, Config, ConfigError
from .limits import Limits


@dataclass(frozen=True)
class Settings:
    config: Config
    secrets: Mapping[str, str]          # role -> the secret it proves itself with ("" = none)
    limits: Limits
    server_tls: ssl.SSLContext | None   # None: listen without TLS
    client_tls: ssl.SSLContext | None   # None: connect without TLS

    def secret(self, role: str) -> str:
        """The secret ``role`` authenticates with."""
        return self.secrets[role]


def resolve(config: Config, *, roles: Iterable[str] = protocol.ROLES, listens: bool = True) -> Settings:
    """Read and build everything the configuration names. Raises ConfigError
    naming the key and file at fault (a secret file that cannot be read, a
    certificate that does not load, build steps the runner would refuse).

    A tool passes the ``roles`` it speaks as and ``listens=False``: it reads
    only its own secrets and builds no server context, so a daemon-only file
    it cannot see (another role's secret, a server key) does not stop it."""
    _check_build(config)
    return Settings(config=config, secrets=_secrets(config.auth, roles), limits=config.net,
                    server_tls=_tls(config, listening=True) if listens else None,
                    client_tls=_tls(config, listening=False))


def _secrets(auth: AuthConfig, roles: Iterable[str]) -> dict[str, str]:
    """Each role's own secret (``<role>_secret_file``, then ``<role>_secret``), else the shared one."""
    shared = _read_secret(auth, "secret")       # read once, not once per role
    return {role: _read_secret(auth, f"{role}_secret") or shared for role in roles}


def _read_secret(auth: AuthConfig, key: str) -> str:
    """``auth.<key>_file``'s content (stripped) when set, else ``auth.<key>``.
    Errors name the key and the file, never the secret."""
    path_text = getattr(auth, f"{key}_file")
    if path_text:
        path = Path(path_text).expanduser()
        try:
            return path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not a text file"
            raise ConfigError(f"auth.{key}_file: cannot read {path}: {why}") from None
    return getattr(auth, key)


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
