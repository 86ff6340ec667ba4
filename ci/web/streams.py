"""What is not a page: live updates (server-sent events), the plain log, artifact
downloads, the badge and the metrics.

``/events`` tells a page that what it shows changed (the tracker's version);
the page then fetches itself again and swaps the parts marked
``data-refresh``. ``/builds/N/log/live`` follows a running build's log
(``read_log`` with ``follow``) and sends each new line already rendered.
Downloads stream: neither a log nor an artifact is held whole in memory.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

from aiohttp import web
from markupsafe import escape

from .. import net, patterns, protocol
from .link import STREAM_IDLE
from .logview import LogRenderer
from .metrics import CONTENT_TYPE
from .pages import build_id

routes = web.RouteTableDef()

THROTTLE = 0.5          # seconds between two change events to one page: a burst costs one refetch
KEEPALIVE = 15.0        # a comment this often finds a browser that went away
LOG_IDLE = 15.0


def _sse(event: str, payload: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


async def _open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    return response


@routes.get("/events")
async def events(request: web.Request) -> web.StreamResponse:
    tracker, stopping = request.app["tracker"], request.app["stopping"]
    response = await _open_sse(request)
    try:
        seen = int(request.query.get("v", ""))
    except ValueError:
        seen = tracker.version
    try:
        while not stopping.is_set():
            if tracker.version != seen:
                seen = tracker.version
                await response.write(_sse("change", {"version": seen, "connected": tracker.connected,
                                                     "problem": tracker.problem}))
                await asyncio.sleep(THROTTLE)
                continue
            if await tracker.wait(seen, KEEPALIVE) == seen:
                await response.write(b": keepalive\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return response


@routes.get(r"/builds/{id:\d+}/log/live")
async def log_live(request: web.Request) -> web.StreamResponse:
    """New lines of a running build's log from ``offset`` (numbered from ``line``), until it ends."""
    number = build_id(request)
    try:
        offset = int(request.query.get("offset", "0"))
        line = int(request.query.get("line", "1"))
    except ValueError:
        raise web.HTTPBadRequest(text="offset and line must be whole numbers") from None
    link, stopping = request.app["link"], request.app["stopping"]
    renderer = LogRenderer(max(1, line))
    response = await _open_sse(request)
    try:
        while not stopping.is_set():
            msg = {"type": "read_log", "build": number, "offset": max(0, offset), "follow": True}
            try:
                async with link.stream(msg, idle=LOG_IDLE) as frames:
                    async for frame in frames:
                        if frame["type"] == "chunk":
                            data = frame["data"]
                            skip = offset - frame["offset"]         # a resent start: only what is new
                            if skip > 0:
                                data = data.encode()[skip:].decode(errors="replace")
                            offset = max(offset, frame["offset"] + len(frame["data"].encode()))
                            html = renderer.feed(data)
                            if html:
                                await response.write(_sse("lines", {"html": str(html), "offset": offset,
                                                                         "line": renderer.line}))
                        elif frame["type"] == "end":
                            tail = renderer.flush()
                            await response.write(_sse("end", {"html": str(tail), "status": frame["status"]}))
                            return response
            except net.PeerTimeout:
                await response.write(b": keepalive\n\n")      # a quiet build: follow again from here
            except protocol.RemoteError as exc:                 # no such build: nothing to follow
                await response.write(_sse("end", {"html": "", "status": exc.message or exc.code}))
                return response
            except (net.PeerError, protocol.ProtocolError) as exc:
                await response.write(_sse("problem", {"message": str(exc)}))
                await asyncio.sleep(2.0)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return response


# ---------------------------------------------------------------- downloads

@routes.get(r"/builds/{id:\d+}/log")
async def plain_log(request: web.Request) -> web.StreamResponse:
    """The log as the dispatcher stores it, streamed in its chunks."""
    number = build_id(request)
    link = request.app["link"]
    response: web.StreamResponse | None = None
    async with link.stream({"type": "read_log", "build": number, "binary": True}, idle=STREAM_IDLE) as frames:
        try:
            async for frame in frames:
                if response is None:
                    response = web.StreamResponse(headers={
                        "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store",
                        "Content-Disposition": f'inline; filename="build-{number}.log"'})
                    await response.prepare(request)
                if frame["type"] == "chunk":
                    await response.write(frame["data"])         # bytes: binary chunks
        except protocol.RemoteError as exc:
            if response is None and exc.code == "not_found":
                raise web.HTTPNotFound(text=f"no build {number}") from None
            raise
    return response


@routes.get(r"/builds/{id:\d+}/artifacts/{path:.+}")
async def artifact(request: web.Request) -> web.StreamResponse:
    """One artifact, always as a download (an artifact is never shown as a page
    of this site: an uploaded .html must not run here)."""
    number, path = build_id(request), request.match_info["path"]
    if not protocol.PATH.check(path):
        raise web.HTTPNotFound()
    link = request.app["link"]
    offset, response = 0, None
    while True:
        try:
            reply = await link.request({"type": "fetch_artifact", "build": number, "path": path, "offset": offset})
        except protocol.RemoteError as exc:
            if response is None and exc.code in ("not_found", "bad_path"):
                raise web.HTTPNotFound(text=f"build {number} has no artifact {path}") from None
            raise
        chunk = reply["data"]           # bytes, from a bulk frame
        if response is None:
            name = path.rsplit("/", 1)[-1]
            response = web.StreamResponse(headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(reply["size"]),
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}"})
            await response.prepare(request)
        await response.write(chunk)
        offset += len(chunk)
        if reply["eof"] or not chunk:
            await response.write_eof()
            return response


# ---------------------------------------------------------------- badge and metrics

BADGE = {"passed": ("passing", "#2e7d32"), "failed": ("failing", "#c62828"), "error": ("failing", "#c62828"),
         "running": ("running", "#1f6feb"), "unknown": ("unknown", "#757575")}
BADGE_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="20" role="img" aria-label="build: {word}">
<title>build: {word}</title>
<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient>
<clipPath id="r"><rect width="{w}" height="20" rx="3" fill="#fff"/></clipPath>
<g clip-path="url(#r)"><rect width="{lw}" height="20" fill="#555"/><rect x="{lw}" width="{rw}" height="20" fill="{colour}"/><rect width="{w}" height="20" fill="url(#s)"/></g>
<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11">
<text x="{lx}" y="14">build</text><text x="{rx}" y="14">{word}</text></g>
</svg>
"""


def badge_svg(status: str) -> str:
    word, colour = BADGE.get(status, BADGE["unknown"])
    lw, rw = 6 * len("build") + 12, 7 * len(word) + 10
    return BADGE_SVG.format(w=lw + rw, lw=lw, rw=rw, lx=lw / 2, rx=lw + rw / 2, colour=colour, word=escape(word))


@routes.get(r"/badge/{name:.+}")
async def badge(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not name.endswith(".svg") or not patterns.is_branch(name[:-4]):
        raise web.HTTPNotFound(text="a badge is /badge/BRANCH.svg")
    repo = request.query.get("repo") or None
    if repo is not None and not protocol.REPO.check(repo):
        raise web.HTTPBadRequest(text="repo: expected a repository path or URL")
    state = await request.app["data"].branch_status(name[:-4], repo)
    return web.Response(text=badge_svg(state["status"]), content_type="image/svg+xml",
                        headers={"Cache-Control": "no-cache, max-age=0"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = request.app["tracker"].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
