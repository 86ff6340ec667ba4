"""TLS contexts for every connection, from the paths of the ``tls`` section
(standard library ssl).

A daemon with ``tls.cert`` listens with TLS; with ``tls.ca`` as well it asks
every client for a certificate signed by that CA (mutual TLS). A client uses
TLS whenever ``tls.cert`` or ``tls.ca`` is set: it checks the server's
certificate against ``tls.ca`` (or the system's CAs without one), including
that it names the address dialled, and presents ``tls.cert`` when it has one.
TLS protects the wire and proves machines; roles are still proved by the
HMAC handshake of net.py on top.

Takes plain paths and knows nothing of the configuration module:
``settings.resolve`` calls it once at start-up and turns a ``TLSError``
(whose message names the ``tls.*`` key at fault) into a ConfigError.
"""

from __future__ import annotations

from pathlib import Path

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)

# ssl is imported only when a context is made: a tool without TLS (the common
# case) does not pay for it at each start
if TYPE_CHECKING:
    import ssl


class TLSError(Exception):
    """A certificate, key or CA that cannot be used; the message names the tls.* key and the file."""


def server_context(cert: str = "", key: str = "", ca: str = "") -> ssl.SSLContext | None:
    """A context for listening, or None without a certificate (plain TCP)."""
    if not cert:
        if key:
            raise TLSError("tls.key is set but tls.cert is not: a server needs its certificate")
        return None
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key)
    if ca:
        _load_ca(ctx, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: str = "", key: str = "", ca: str = "") -> ssl.SSLContext | None:
    """A context for connecting, or None when neither a certificate nor a CA is given."""
    if not (cert or ca):
        return None
    import ssl
    if ca:
        # our CA only: a certificate from a public CA must not pass for one of our daemons
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # verifies the chain and the host name
        _load_ca(ctx, ca)
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        _load_chain(ctx, cert, key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    import ssl
    for name, path in (("tls.cert", cert), ("tls.key", key)):
        if path and not Path(path).is_file():
            raise TLSError(f"{name}: {path} does not exist or is not a file")
    try:
        ctx.load_cert_chain(cert, key or None)
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(f"tls.cert/tls.key: cannot load {cert}"
                       f"{' and ' + key if key else ''}: {getattr(exc, 'reason', None) or exc}") from None


def _load_ca(ctx: ssl.SSLContext, path: str) -> None:
    import ssl
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(f"tls.ca: cannot load {path}: {getattr(exc, 'reason', None) or exc}") from None
