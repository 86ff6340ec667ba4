"""TLS for every connection, from the ``tls`` section (standard library ssl).

A daemon with ``tls.cert`` listens with TLS; with ``tls.ca`` as well it asks
every client for a certificate signed by that CA (mutual TLS). A client uses
TLS whenever ``tls.cert`` or ``tls.ca`` is set: it checks the server's
certificate against ``tls.ca`` (or the system's CAs without one), including
that it names the address dialled, and presents ``tls.cert`` when it has one.
TLS protects the wire and proves machines; roles are still proved by the
HMAC handshake of net.py on top.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .config import ConfigError, TLSConfig


def server_context(cfg: TLSConfig) -> ssl.SSLContext | None:
    if not cfg.cert:
        if cfg.key:
            raise ConfigError("tls.key is set but tls.cert is not: a server needs its certificate")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cfg)
    if cfg.ca:
        _load_ca(ctx, cfg.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cfg: TLSConfig) -> ssl.SSLContext | None:
    if not (cfg.cert or cfg.ca):
        return None
    if cfg.ca:
        # our CA only: a certificate from a public CA must not pass for one of our daemons
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # verifies the chain and the host name
        _load_ca(ctx, cfg.ca)
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert:
        _load_chain(ctx, cfg)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cfg: TLSConfig) -> None:
    for key, path in (("tls.cert", cfg.cert), ("tls.key", cfg.key)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}: {path} does not exist or is not a file")
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.cert/tls.key: cannot load {cfg.cert}"
                          f"{' and ' + cfg.key if cfg.key else ''}: {getattr(exc, 'reason', None) or exc}") from None


def _load_ca(ctx: ssl.SSLContext, path: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.ca: cannot load {path}: {getattr(exc, 'reason', None) or exc}") from None
