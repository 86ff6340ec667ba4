"""A real `tinyci web` process beside a real cluster (tests/daemons.py), and
plain HTTP to it with the standard library: the helper the web tests share.

Redirects are not followed (a test sees the 303 to /login); every request
has a timeout; the process is a ``daemons.Daemon``, stopped by its PID with
the rest of the cluster."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.cookies import SimpleCookie

from daemons import Cluster, Daemon

TIMEOUT = 15.0


@dataclass
class Reply:
    status: int
    headers: dict
    text: str

    def json(self):
        return json.loads(self.text)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@dataclass
class Site:
    """HTTP to one web process, keeping its cookies."""

    base: str
    cookies: dict = field(default_factory=dict)

    def request(self, path: str, data: dict | None = None, headers: dict | None = None) -> Reply:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(self.base + path, data=body, headers=dict(headers or {}))
        if self.cookies:
            request.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            response = opener.open(request, timeout=TIMEOUT)
            status, raw, text = response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, raw, text = exc.code, exc.headers, exc.read().decode()
        for value in raw.get_all("Set-Cookie") or []:
            jar = SimpleCookie(value)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0" or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return Reply(status, {k.lower(): v for k, v in raw.items()}, text)

    def get(self, path: str, **headers) -> Reply:
        return self.request(path, headers=headers)

    def ok(self, path: str) -> Reply:
        reply = self.get(path)
        assert reply.status == 200, f"GET {path}: {reply.status} {reply.text[:500]}"
        return reply

    def json(self, path: str):
        return self.ok(path).json()


def start_web(cluster: Cluster, *args: str) -> tuple[Daemon, Site]:
    """`tinyci web` on a free port reading ``cluster``'s dispatcher, with its config file."""
    daemon = cluster.start("web", "web", ["--port", "0", "--dispatcher", cluster.disp.addr, *args])
    return daemon, Site(daemon.addr)


def start_site(cluster_factory, repo) -> tuple[Cluster, Site]:
    """A dispatcher, one runner r1, the observer on ``repo`` (whose build step is
    ``sh build.sh``) and a web process. The caller waits for the first build in
    its own way (the browser tests cannot run an event loop of their own)."""
    c = cluster_factory(steps=["sh build.sh"])
    c.dispatcher()
    c.runner("r1")
    c.observer(repo)
    _, site = start_web(c)
    return c, site
