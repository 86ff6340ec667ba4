"""A forge's push webhooks: ``POST /hooks/github``, ``/hooks/gitea``,
``/hooks/gitlab``. Each checks its forge's proof on the raw body before
reading anything in it (GitHub: ``X-Hub-Signature-256: sha256=<hex>``, an
HMAC-SHA256 of the body; Gitea: ``X-Gitea-Signature: <hex>``, the same;
GitLab: ``X-Gitlab-Token``, the token itself), compared in constant time,
then pokes the observer, as the git hook's ``tinyci notify`` does (the
``poke`` message, role observer): with ``observer.fetch`` on, the observer
fetches at once and reports what the push brought.

A forge whose secret is not configured has no hook here (404). A missing or
wrong proof is 401 or 403 with the reason, and nothing is poked. Events other
than a push of a branch (GitHub's ``ping``, a tag, an issue) are answered and
ignored. The payload is trusted for nothing but the branch name in ``ref``
(a hint to the observer's log): what to build always comes from the clone.
The paths are outside the login (``web.users``/``web.token``): the forge's
signature is their login.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from aiohttp import web

from .. import net, patterns, protocol
from ..config import Config, ConfigError

log = logging.getLogger("ci.web")

MAX_BODY = 25 << 20             # GitHub caps a delivery at 25 MiB; a bigger body is not a forge's
POKE_TIMEOUT = 10.0
HEADS = "refs/heads/"

routes = web.RouteTableDef()


@dataclass(frozen=True)
class Forge:
    name: str
    key: str                    # web.<key> (and web.<key>_file): the secret
    proof: str                  # the header carrying the signature or token
    event: str                  # the header naming the event
    push: str                   # that header's value for a push
    check: Callable[[bytes, bytes, str], bool]      # (secret, body, header) -> proven


def _hmac_hex(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def _raw(header: str) -> bytes:
    """A header's bytes. surrogateescape: one of stray bytes is a wrong proof (403), not a crash (500)."""
    return header.encode("utf-8", "surrogateescape")


def _github(secret: bytes, body: bytes, header: str) -> bool:
    return hmac.compare_digest(_raw(header.strip()), f"sha256={_hmac_hex(secret, body)}".encode())


def _gitea(secret: bytes, body: bytes, header: str) -> bool:
    return hmac.compare_digest(_raw(header.strip().lower()), _hmac_hex(secret, body).encode())


def _gitlab(secret: bytes, body: bytes, header: str) -> bool:
    return hmac.compare_digest(_raw(header), secret)


FORGES = {
    "github": Forge("github", "github_secret", "X-Hub-Signature-256", "X-GitHub-Event", "push", _github),
    "gitea": Forge("gitea", "gitea_secret", "X-Gitea-Signature", "X-Gitea-Event", "push", _gitea),
    "gitlab": Forge("gitlab", "gitlab_token", "X-Gitlab-Token", "X-Gitlab-Event", "Push Hook", _gitlab),
}


def secrets(config: Config) -> dict[str, bytes]:
    """Each configured forge's secret (``web.<key>_file`` wins over ``web.<key>``).
    Raises ConfigError naming the key and file, never the secret."""
    found = {}
    for forge in FORGES.values():
        text = getattr(config.web, forge.key)
        path = getattr(config.web, f"{forge.key}_file")
        if path:
            try:
                text = Path(path).expanduser().read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or "not a text file"
                raise ConfigError(f"web.{forge.key}_file: cannot read {path}: {why}") from None
            if not text:
                raise ConfigError(f"web.{forge.key}_file: {path} is empty")
        if text:
            found[forge.name] = text.encode()
    return found


@dataclass(frozen=True)
class Observer:
    """Where and how the hooks poke the observer."""

    addr: str
    secret: str
    limits: Any
    tls: Any

    async def poke(self, branch: str | None) -> None:
        """Raises net.PeerError, protocol.ProtocolError or protocol.RemoteError."""
        msg: dict = {"type": "poke"}
        if branch:
            msg["branch"] = branch
        await net.call(self.addr, msg, protocol.OBSERVER, self.secret, self.limits, POKE_TIMEOUT, self.tls,
                       to=protocol.OBSERVER_ID)


def _reply(status: int, **fields: Any) -> web.Response:
    return web.json_response(fields, status=status)


async def _body(request: web.Request) -> bytes | None:
    """The raw body, or None when it is larger than MAX_BODY."""
    if (request.content_length or 0) > MAX_BODY:
        return None
    data = bytearray()
    while True:
        chunk = await request.content.read(1 << 16)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > MAX_BODY:
            return None


def branch_of(payload: Any) -> str | None:
    """The branch a push payload's ``ref`` names (all three forges put it there), or None."""
    ref = payload.get("ref") if isinstance(payload, Mapping) else None
    if not isinstance(ref, str) or not ref.startswith(HEADS):
        return None
    return ref[len(HEADS):]


@routes.post("/hooks/{forge}")
async def receive(request: web.Request) -> web.Response:
    forge = FORGES.get(request.match_info["forge"])
    if forge is None:
        return _reply(404, error=f"no webhook at {request.path} (known: /hooks/{', /hooks/'.join(FORGES)})")
    secret = request.app["hook_secrets"].get(forge.name)
    if secret is None:
        return _reply(404, error=f"the {forge.name} webhook is off: set web.{forge.key} "
                                 f"(or web.{forge.key}_file) in tinyci web's configuration")
    body = await _body(request)
    if body is None:
        return _reply(413, error=f"the body is larger than {MAX_BODY} bytes")
    proof = request.headers.get(forge.proof)
    if proof is None:
        log.warning("%s webhook from %s refused: no %s header", forge.name, request.remote, forge.proof)
        return _reply(401, error=f"no {forge.proof} header: set the secret in the {forge.name} "
                                 f"webhook's settings")
    if not forge.check(secret, body, proof):
        log.warning("%s webhook from %s refused: %s does not match", forge.name, request.remote, forge.proof)
        return _reply(403, error=f"{forge.proof} does not match: the webhook's secret differs from "
                                 f"web.{forge.key}")
    return await _proven(request, forge, body)


async def _proven(request: web.Request, forge: Forge, body: bytes) -> web.Response:
    """A delivery whose proof held: a push of a branch pokes the observer."""
    event = request.headers.get(forge.event, "")
    if forge.name == "github" and event == "ping":
        return _reply(200, ok=True, pong=True)
    if event != forge.push:
        return _reply(202, ok=True, ignored=f"event {event[:100]!r} is not a push")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _reply(400, error="the body is not JSON (set the webhook's content type to application/json)")
    branch = branch_of(payload)
    if branch is None:
        return _reply(202, ok=True, ignored="not a push of a branch (a tag?)")
    observer: Observer = request.app["hook_observer"]
    hint = branch if patterns.is_branch(branch) else None
    try:
        await observer.poke(hint)
    except (net.PeerError, protocol.ProtocolError, protocol.RemoteError) as exc:
        log.warning("%s webhook: cannot poke the observer at %s: %s", forge.name, observer.addr, exc)
        return _reply(503, error=f"the observer at {observer.addr} cannot be reached: {exc}")
    log.info("%s webhook: push to %s; poked the observer", forge.name, branch[:200])
    return _reply(202, ok=True, branch=branch, poked=observer.addr)
