"""The configuration resolved once, at start-up, into what the daemons and
tools use: every role's secret read from its file, the connection limits,
the TLS contexts made. Built by ``resolve`` and handed down; nothing below
reads a secret file or builds a context again.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Mapping

from . import net, protocol
from .config import Config


@dataclass(frozen=True)
class Settings:
    config: Config
    secrets: Mapping[str, str]          # role -> the secret it proves itself with ("" = none)
    limits: net.Limits
    server_tls: ssl.SSLContext | None   # None: listen without TLS
    client_tls: ssl.SSLContext | None   # None: connect without TLS

    def secret(self, role: str) -> str:
        """The secret ``role`` authenticates with."""
        return self.secrets[role]


def resolve(config: Config) -> Settings:
    """Read and build everything the configuration names. Raises ConfigError
    naming the key and file at fault (a secret file that cannot be read, a
    certificate that does not load)."""
    secrets = config.secrets()
    return Settings(config=config, secrets={role: secrets[role] for role in protocol.ROLES},
                    limits=config.limits(), server_tls=config.server_tls(), client_tls=config.client_tls())
