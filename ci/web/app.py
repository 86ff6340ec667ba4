"""The web process: an aiohttp application over a ``Link`` to the dispatcher.

Pages and their JSON twins are in ``pages``, live updates, downloads, the
badge and metrics in ``streams``; this module puts them together with what
every response shares: the login gate (``auth``), the errors worded for a
page or for JSON, and headers that keep peer text inert even if it were
ever let through unescaped (a Content-Security-Policy with no inline
script, nosniff, no framing). It prints ``tinyci web listening on
http://HOST:PORT`` once it serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from pathlib import Path

from aiohttp import web

from .. import aio, daemon, net, protocol
from ..config import ConfigError, load
from ..local import dial_host, find_up, tool_secret, up_address
from ..settings import resolve
from . import actions, hooks, pages, streams
from .auth import COOKIE, LOGIN_CSRF_COOKIE, Gate, same_origin, well_formed
from .data import BadRequest, Data
from .link import Link, Unreachable
from .tracker import Tracker
from .views import environment

log = logging.getLogger("ci.web")

STATIC = Path(__file__).resolve().parent / "static"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
OPEN_PATHS = ("/login", "/static/")


def asset_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(STATIC.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


# ---------------------------------------------------------------- middleware

async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith(("/api/", "/hooks/")) or request.path == "/metrics"


def _problem(request: web.Request, status: int, title: str, message: str) -> web.Response:
    if _wants_json(request):
        return web.json_response({"error": message}, status=status)
    return pages.render(request, "message.html", code=status, title=title, message=message)


@web.middleware
async def errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Unreachable as exc:
        return _problem(request, 503, "The dispatcher cannot be reached", str(exc))
    except BadRequest as exc:
        return _problem(request, 400, "Bad request", str(exc))
    except protocol.RemoteError as exc:
        if exc.code == "not_found":
            return _problem(request, 404, "Not found", exc.message)
        return _problem(request, 502, "The dispatcher refused", exc.message or exc.code)
    except web.HTTPNotFound as exc:
        return _problem(request, 404, "Not found", exc.text if exc.text and "404" not in exc.text
                        else f"Nothing at {request.path}")


@web.middleware
async def gate(request: web.Request, handler) -> web.StreamResponse:
    keeper: Gate = request.app["gate"]
    # a webhook's login is its forge's signature, checked by hooks.receive
    if not keeper.required or request.path == "/login" or request.path.startswith(("/static/", "/hooks/")):
        return await handler(request)
    cookie = request.cookies.get(COOKIE)
    user = keeper.session_user(cookie)
    if user is not None:
        request["user"], request["csrf"] = user, keeper.csrf(cookie)
        return await handler(request)
    if keeper.token_ok(request.headers.get("Authorization")):
        request["user"] = None
        return await handler(request)
    if request.method == "GET" and not _wants_json(request) and request.path != "/events" \
            and not request.path.startswith("/badge/"):
        raise web.HTTPSeeOther("/login" + pages.query({"next": request.path_qs}))
    return web.json_response({"error": "log in, or send Authorization: Bearer TOKEN"}, status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="tinyci"'})


# ---------------------------------------------------------------- login

def _next(target: str) -> str:
    return target if target.startswith("/") and not target.startswith("//") else "/"


async def login_form(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    nonce = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(16)
    response = pages.render(request, "login.html", code=status, error=error,
                            login_csrf=request.app["gate"].csrf(nonce), next=_next(request.query.get("next", "/")))
    response.set_cookie(LOGIN_CSRF_COOKIE, nonce, httponly=True, samesite="Strict", path="/login")
    return response


async def login(request: web.Request) -> web.StreamResponse:
    keeper: Gate = request.app["gate"]
    if not keeper.users:
        return _problem(request, 404, "No login", "This tinyci web has no users configured (web.users).")
    if request.method == "GET":
        return await login_form(request)
    form = await request.post()
    if not same_origin(request.headers.get("Origin"), request.host) or \
            not keeper.csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE),
                                                       form.get("csrf")):
        return await login_form(request, "The form expired; try again.", 403)
    cookie = await aio.in_thread(keeper.login, str(form.get("user", ""))[:200], str(form.get("password", ""))[:1000])
    if cookie is None:
        log.warning("failed login for %r from %s", str(form.get("user", ""))[:40], request.remote)
        return await login_form(request, "Wrong name or password.", 401)
    response = web.HTTPSeeOther(_next(str(form.get("next", "/"))))
    response.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", path="/",
                        secure=request.secure, max_age=int(keeper.session_seconds))
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    if not same_origin(request.headers.get("Origin"), request.host) or \
            not request.app["gate"].csrf_ok(request.cookies.get(COOKIE), form.get("csrf")):
        raise web.HTTPForbidden(text="the form expired; reload the page")
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


# ---------------------------------------------------------------- the application

def make_app(link: Link, keeper: Gate, allow_actions: bool = False, hook_secrets: dict | None = None,
             hook_observer: hooks.Observer | None = None) -> web.Application:
    app = web.Application(middlewares=[errors, gate])
    app["link"], app["gate"], app["actions"] = link, keeper, allow_actions
    app["hook_secrets"], app["hook_observer"] = hook_secrets or {}, hook_observer
    app["data"] = Data(link)
    app["tracker"] = Tracker()
    app["env"] = environment()
    app["asset_version"] = asset_version()
    app["stopping"] = asyncio.Event()
    app.add_routes(pages.routes)
    app.add_routes(streams.routes)
    app.add_routes(actions.routes)
    app.add_routes(hooks.routes)
    app.router.add_route("*", "/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_static("/static", STATIC)
    app.on_response_prepare.append(_headers)

    async def follow(app: web.Application):
        task = asyncio.ensure_future(link.watch(app["tracker"], app["stopping"]))
        yield
        app["stopping"].set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()

    app.cleanup_ctx.append(follow)

    async def on_shutdown(app: web.Application) -> None:
        app["stopping"].set()           # ends the open event streams...
        app["tracker"].changed.set()    # ...now, not at their next keep-alive

    app.on_shutdown.append(on_shutdown)
    return app


# ---------------------------------------------------------------- the process

def _gate(config) -> Gate:
    web_cfg = config.web
    for name, stored in web_cfg.users.items():
        if not well_formed(stored):
            raise daemon.StartupError(f"configuration error: {config.origin('web', 'users')}: web.users.{name} "
                                      f"is not a password hash (make one with `tinyci web --hash-password`)")
    token = web_cfg.token
    if web_cfg.token_file:
        try:
            token = Path(web_cfg.token_file).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise daemon.StartupError(f"configuration error: web.token_file: cannot read {web_cfg.token_file}: "
                                      f"{getattr(exc, 'strerror', None) or 'not a text file'}") from None
    return Gate(web_cfg.users, token, web_cfg.session_hours * 3600)


def _check_exposure(host: str, keeper: Gate, insecure: bool) -> None:
    """The daemons' rule: loopback, or a login, or --insecure (then a warning)."""
    if daemon.is_loopback(host) or keeper.required:
        return
    what = ("anyone who can reach this port could read every build, its log and artifacts, "
            "and the runners' names and addresses")
    if not insecure:
        raise daemon.StartupError(
            f"refusing to listen on {host or 'every interface'}: no login is configured, so {what}. "
            f"Set web.users (names and hashes from `tinyci web --hash-password`) or web.token, "
            f"listen on 127.0.0.1, or pass --insecure to accept the risk")
    log.warning("--insecure: listening on %s with no login: %s", host or "every interface", what)


def _hook_observer(config) -> hooks.Observer:
    """Where and as whom the webhooks poke: web.observer, else the `tinyci up`
    above's observer, else observer.host:port; with the observer's secret,
    else (under `tinyci up`, which hands the web only the reader's) up's own."""
    target = config.web.observer or up_address("observer") or \
        f"{dial_host(config.observer.host)}:{config.observer.port}"
    try:
        net.parse_addr(target)
    except ValueError as exc:
        raise ConfigError(f"{config.origin('web', 'observer')}: web.observer: {exc}") from None
    try:
        settings = resolve(config, roles=[protocol.OBSERVER], listens=False)
        secret = tool_secret(settings, protocol.OBSERVER)
    except ConfigError as exc:
        up = find_up()
        if up is None or not up.secret:
            raise ConfigError(f"the webhooks poke the observer, with its secret: {exc}") from None
        settings = resolve(config, roles=[], listens=False)
        secret = up.secret
    return hooks.Observer(target, secret, settings.limits, settings.client_tls)


def main(args) -> int:

    async def body(stop: asyncio.Event) -> None:
        overrides = {"web": {"host": args.host, "port": args.port, "dispatcher": args.dispatcher}}
        try:
            config = load(args.config, overrides=overrides)
            # the reader's secret only, unless actions are on: then the operator's too;
            # with a forge's webhook, the observer's (to poke, as the git hook does)
            roles = [protocol.READER, protocol.OPERATOR] if config.web.actions else [protocol.READER]
            settings = resolve(config, roles=roles, listens=False)
            hook_secrets = hooks.secrets(config)
            observer = _hook_observer(config) if hook_secrets else None
        except ConfigError as exc:
            raise daemon.StartupError(f"configuration error: {exc}") from None
        keeper = _gate(config)
        if config.web.actions and not keeper.users:
            raise daemon.StartupError(f"configuration error: {config.origin('web', 'actions')}: web.actions "
                                      f"needs web.users: only a logged-in user may rebuild, cancel or trigger")
        host, port = config.web.host, config.web.port
        _check_exposure(host, keeper, args.insecure)
        target = config.web.dispatcher or f"{dial_host(config.dispatcher.host)}:{config.dispatcher.port}"
        try:
            dhost, dport = net.parse_addr(target)
        except ValueError as exc:
            raise daemon.StartupError(f"--dispatcher: {exc}") from None
        link = Link(dhost, dport, {role: tool_secret(settings, role) for role in roles}, settings.limits,
                    settings.client_tls)
        runner = web.AppRunner(make_app(link, keeper, config.web.actions, hook_secrets, observer),
                               access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, shutdown_timeout=2.0)
        try:
            await daemon.listen(site.start, "web", host, port)
            bound_host, bound_port = runner.addresses[0][:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            if observer is not None:
                log.info("push webhooks on at %s; they poke the observer at %s",
                         ", ".join(f"/hooks/{name}" for name in sorted(hook_secrets)), observer.addr)
            daemon.announce("web", f"http://{shown}", bound_port, f" (dispatcher {link.addr})")
            await stop.wait()
        finally:
            await runner.cleanup()

    return daemon.run("web", body, args.verbose, args.log_file)
