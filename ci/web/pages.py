"""The HTML pages and their JSON twins. Each handler asks ``Data`` once and
hands the same dict to a template (``/...``) or to JSON (``/api/...``)."""

from __future__ import annotations

from aiohttp import web
from markupsafe import Markup

from .. import patterns, protocol
from .data import PAGE, STATUSES, WINDOW, Data, filters_from, number
from .logview import LogRenderer
from .views import query

routes = web.RouteTableDef()


def render(request: web.Request, template: str, code: int = 200, **context) -> web.Response:
    app = request.app
    tracker = app["tracker"]
    page = app["env"].get_template(template).render(
        connected=tracker.connected, problem=tracker.problem, version=tracker.version,
        conditions=[f"dispatcher: {c.get('message') or c.get('name', '')}" for c in tracker.conditions],
        user=request.get("user"), csrf=request.get("csrf", ""), path=request.path_qs,
        actions=app["actions"] and bool(request.get("user")),
        asset=app["asset_version"], **context)
    return web.Response(text=page, status=code, content_type="text/html")


def data(request: web.Request) -> Data:
    return request.app["data"]


def build_id(request: web.Request) -> int:
    value = int(request.match_info["id"])
    if not protocol.BUILD_ID.check(value):
        raise web.HTTPNotFound(text=f"no build {value}")
    return value


# ---------------------------------------------------------------- the overview

@routes.get("/")
async def overview(request: web.Request) -> web.Response:
    return render(request, "overview.html", **await data(request).overview())


@routes.get("/api/queue")
async def api_queue(request: web.Request) -> web.Response:
    view = await data(request).overview()
    return web.json_response({"queue": view["queue"], "queued": view["queued"]})


@routes.get("/runners")
async def runners(request: web.Request) -> web.Response:
    return render(request, "runners.html", runners=await data(request).runners())


@routes.get("/api/runners")
async def api_runners(request: web.Request) -> web.Response:
    return web.json_response({"runners": await data(request).runners()})


# ---------------------------------------------------------------- history

async def _history(request: web.Request, fixed: dict | None = None) -> dict:
    params = request.query
    filters = {**filters_from(params), **(fixed or {})}
    limit = number(params, "limit", 1, 500) or PAGE
    before, after = number(params, "before"), number(params, "after")
    page = await data(request).history(filters, before, after, limit)
    shown = {k: v for k, v in filters.items() if k not in (fixed or {})}
    if limit != PAGE:
        shown["limit"] = limit
    page["filters"] = shown
    page["next"] = ({**shown, "before": page["builds"][-1]["id"]} if page["older"] and page["builds"] else None)
    page["prev"] = ({**shown, "after": page["builds"][0]["id"]} if page["newer"] and page["builds"] else None)
    return page


@routes.get("/builds")
async def history(request: web.Request) -> web.Response:
    return render(request, "history.html", statuses=STATUSES, **await _history(request))


@routes.get("/api/builds")
async def api_history(request: web.Request) -> web.Response:
    page = await _history(request)
    base = "/api/builds"
    return web.json_response({"builds": page["builds"], "older": page["older"], "newer": page["newer"],
                              "next": base + query(page["next"]) if page["next"] else None,
                              "prev": base + query(page["prev"]) if page["prev"] else None})


@routes.get(r"/branches/{name:.+}")
async def branch(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not patterns.is_branch(name):
        raise web.HTTPNotFound(text=f"no branch {name!r}")
    page = await _history(request, {"branch": name})
    badge = await data(request).branch_status(name)
    return render(request, "branch.html", branch=name, badge=badge, statuses=STATUSES, **page)


@routes.get(r"/commits/{sha:[0-9a-fA-F]{1,40}}")
async def commit(request: web.Request) -> web.Response:
    view = await data(request).commit(request.match_info["sha"].lower())
    if not view["builds"]:
        return render(request, "message.html", code=404, title="No such commit",
                      message=f"No build of a commit starting {view['sha']}.")
    return render(request, "commit.html", **view)


# ---------------------------------------------------------------- one build

def log_lines(window: dict, build_status: str) -> tuple[Markup, dict | None]:
    """The window's lines as HTML, and where a live follow picks up (None: no
    follow; the window is not the log's end, or the log is final). A running
    log's last line without its newline is left to the follow, which sends it whole."""
    renderer = LogRenderer(window["line"])
    html = renderer.feed(window["data"])
    end = window["offset"] + len(window["data"].encode())
    at_end = end >= window["size"]
    if build_status in ("queued", "running") and at_end:
        pending = len(renderer.partial.encode())
        return html, {"offset": end - pending, "line": renderer.line}
    return html + renderer.flush(), None


async def _build(request: web.Request) -> dict:
    params = request.query
    return await data(request).build(build_id(request), offset=number(params, "offset", 0),
                                     line=number(params, "line"))


def window_nav(window: dict) -> dict:
    """Offsets of the windows before and after this one (None at the log's ends)."""
    end = window["offset"] + len(window["data"].encode())
    return {"earlier": max(0, window["offset"] - WINDOW) if window["offset"] > 0 else None,
            "later": end if end < window["size"] else None}


@routes.get(r"/builds/{id:\d+}")
async def build(request: web.Request) -> web.Response:
    view = await _build(request)
    html, follow = log_lines(view["log"], view["build"]["status"])
    return render(request, "build.html", lines=html, follow=follow, nav=window_nav(view["log"]), **view)


@routes.get(r"/api/builds/{id:\d+}")
async def api_build(request: web.Request) -> web.Response:
    view = await _build(request)
    view["log"]["url"] = f"/builds/{view['build']['id']}/log"
    return web.json_response(view)
