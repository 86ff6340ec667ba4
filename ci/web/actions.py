"""What a logged-in user may change, when ``web.actions`` is on: cancel or
rebuild a build, build a branch's head. Each is a form posted from a page
of this site (its CSRF token bound to the session, its Origin ours) and
becomes one request to the dispatcher with the operator role (``cancel``,
``rebuild``, ``trigger``); the web process holds that secret only then.
A bearer token reads; it never acts."""

from __future__ import annotations

import logging

from aiohttp import web

from .. import patterns, protocol
from .auth import COOKIE, same_origin
from .pages import build_id, render

log = logging.getLogger("ci.web")
routes = web.RouteTableDef()


async def _actor(request: web.Request) -> str:
    """The user allowed to post this form; raises HTTPNotFound/HTTPForbidden otherwise."""
    if not request.app["actions"]:
        raise web.HTTPNotFound(text="actions are off (web.actions)")
    user = request.get("user")
    if not user:
        raise web.HTTPForbidden(text="log in to do that")
    form = await request.post()
    if not same_origin(request.headers.get("Origin"), request.host) or \
            not request.app["gate"].csrf_ok(request.cookies.get(COOKIE), form.get("csrf")):
        raise web.HTTPForbidden(text="the form expired; reload the page and try again")
    return user


async def _operate(request: web.Request, msg: dict, user: str) -> dict | web.Response:
    try:
        reply = await request.app["link"].request(msg, protocol.OPERATOR)
    except protocol.RemoteError as exc:
        if exc.code == "not_found":
            raise
        return render(request, "message.html", code=409, title=f"Cannot {msg['type']}",
                      message=exc.message or exc.code)
    log.info("%s: %s %s", user, msg["type"], msg.get("build") or msg.get("branch"))
    return reply


@routes.post(r"/builds/{id:\d+}/cancel")
async def cancel(request: web.Request) -> web.StreamResponse:
    number = build_id(request)
    user = await _actor(request)
    reply = await _operate(request, {"type": "cancel", "build": number, "by": f"{user}@web"[:200]}, user)
    if isinstance(reply, web.Response):
        return reply
    raise web.HTTPSeeOther(f"/builds/{number}")


@routes.post(r"/builds/{id:\d+}/rebuild")
async def rebuild(request: web.Request) -> web.StreamResponse:
    number = build_id(request)
    user = await _actor(request)
    reply = await _operate(request, {"type": "rebuild", "build": number}, user)
    if isinstance(reply, web.Response):
        return reply
    raise web.HTTPSeeOther(f"/builds/{reply['builds'][0]}" if reply["builds"] else f"/builds/{number}")


@routes.post(r"/branches/{name:.+}/trigger")
async def trigger(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if not patterns.is_branch(name):
        raise web.HTTPNotFound(text=f"no branch {name!r}")
    user = await _actor(request)
    reply = await _operate(request, {"type": "trigger", "branch": name}, user)
    if isinstance(reply, web.Response):
        return reply
    raise web.HTTPSeeOther(f"/builds/{reply['builds'][0]}" if reply["builds"] else "/")
