"""What a tool finds on this machine without being told: the secret `tinyci
up` made for its daemons (``.tinyci/secret``), and the loopback address of a
daemon that listens on every interface. Standard library only: `tinyci
notify` runs in every git hook and must stay light."""

from __future__ import annotations

import os
from typing import Any

LOCAL_SECRET = os.path.join(".tinyci", "secret")     # the secret `tinyci up` makes for its daemons


def tool_secret(settings: Any, role: str, secret_file: str | None = None) -> str:
    """The secret a tool uses for ``role``: an explicit --secret-file first, then the
    configured one (``settings``, may be None), then the secret `tinyci up` made in .tinyci/."""
    if not secret_file:
        secret = settings.secret(role) if settings is not None else ""
        if secret:
            return secret
    try:
        return open(secret_file or LOCAL_SECRET).read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def dial_host(host: str) -> str:
    """A daemon listening on every interface is reached on loopback."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
