"""The live loop of ``tinyci console`` and ``tinyci status --watch``: it reads
the dispatcher's ``watch`` stream into the view model
(``console_state.ConsoleState``) and redraws it with the renderer (``tui``).

Sends to the dispatcher (role reader): ``watch {limit}`` (a snapshot, then
events, until either side closes) and, for the console, ``read_log {build,
offset, follow}`` for the tail of one build's log. Two tasks feed the
state; a third draws it, at most ``MAX_FPS`` times a second and
only when something changed (or once a second, for ages), so a burst of
events costs one redraw. A lost dispatcher is retried with capped, jittered
backoff while the last picture stays on screen, marked disconnected.

When standard output is not a terminal there are no escape codes: each
change (at most every ``PLAIN_EVERY`` seconds) prints a plain snapshot.
Whatever the dispatcher sent is drawn as plain text (``tui``, ``sanitize``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Callable

from rich.console import Console, RenderableType
from rich.text import Text

from . import aio, net, protocol, tui
from .console_state import ConsoleState
from .sanitize import plain

MAX_FPS = 10
PLAIN_EVERY = 2.0
WATCH_LIMIT = 200           # finished builds in the first snapshot: enough for the last hour's counts
STREAM_IDLE = 30.0          # no frame for this long: the connection may be dead, open a new one
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 5.0


def problem(exc: BaseException) -> str:
    if isinstance(exc, net.PeerRefused):
        return "connection refused"
    if isinstance(exc, net.PeerTimeout):
        return "timed out"
    if isinstance(exc, protocol.RemoteError):
        return exc.message or exc.code
    return str(exc) or type(exc).__name__


class Live:
    """One running view: ``link`` reaches the dispatcher (``cli.DispatcherLink``)."""

    def __init__(self, link, state: ConsoleState, console: Console, view: str = "console", once: bool = False):
        self.link = link
        self.state = state
        self.console = console
        self.view = view            # "console" or "status"
        self.once = once
        self.stop = asyncio.Event()
        self.fatal: str | None = None

    # ------------------------------------------------------------ feeding the state

    async def watch(self) -> None:
        retry = aio.Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        while not self.stop.is_set():
            client = self.link.client(protocol.READER)
            frames = client.stream({"type": "watch", "limit": WATCH_LIMIT}, idle=STREAM_IDLE)
            got_snapshot = False    # this attempt reached the dispatcher
            try:
                async for frame in frames:
                    if frame["type"] == "ok":
                        got_snapshot = True
                        self.state.snapshot(frame)
                        retry.reset()
                        if self.once:
                            return
                    elif frame["type"] == "event":
                        self.state.event(frame)
                    elif frame["type"] == "end":
                        self._lost(frame.get("reason") or "the dispatcher ended the stream")
            except net.PeerTimeout:
                if self.state.connected and got_snapshot:
                    continue        # silence (nothing happened) or a dead link: a fresh watch tells
                # a connect or greeting that timed out: the picture on screen is stale
                self._lost("timed out")
            except (net.PeerError, protocol.RemoteError, protocol.ProtocolError, OSError) as exc:
                if isinstance(exc, net.PeerAuthFailed) or getattr(exc, "code", "") == "auth_failed":
                    self.fatal = self.link.refused()
                    self.stop.set()
                    return
                self._lost(problem(exc))
            finally:
                await frames.aclose()
                await client.close()
            if self.once:
                self.fatal = f"cannot reach the dispatcher at {self.link.addr} ({self.state.problem})"
                self.stop.set()
                return
            await self._sleep(retry.next())

    def _lost(self, why: str) -> None:
        self.state.lost(why, time.time())

    async def follow_log(self) -> None:
        """Tail the log the state says to tail; switch when that changes."""
        retry = aio.Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        while not self.stop.is_set():
            target = self.state.log_target()
            if target is None or (target == self.state.log_build and self.state.log_status is not None):
                await self._sleep(0.2)          # nothing to tail, or its log has ended
                continue
            self.state.log_start(target)
            task = asyncio.ensure_future(self._read_log(target))
            try:
                while not task.done() and self.state.log_target() == target and not self.stop.is_set():
                    await asyncio.wait({task}, timeout=0.2)
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is None:
                retry.reset()
            elif isinstance(exc, protocol.RemoteError) and exc.code == "not_found":
                self.state.log_end(target, "not found")
            else:
                await self._sleep(retry.next())

    async def _read_log(self, build: int) -> None:
        client = self.link.client(protocol.READER)
        follow = not self.once
        frames = client.stream({"type": "read_log", "build": build, "offset": self.state.log_offset,
                                "follow": follow}, idle=STREAM_IDLE)
        try:
            async for frame in frames:
                if frame["type"] == "chunk":
                    self.state.log_chunk(build, frame["offset"], frame["data"])
                elif frame["type"] == "end":
                    if follow:
                        self.state.log_end(build, frame["status"])
        except net.PeerTimeout:
            pass                                # a quiet build: the caller opens a fresh stream
        finally:
            await frames.aclose()
            await client.close()

    # ------------------------------------------------------------ drawing

    def render(self, now: float, width: int, height: int) -> RenderableType:
        if self.view == "status":
            header = tui.render_header(self.state, now, width)
            from rich.console import Group
            return Group(header, Text(""), tui.render_status(self.state.status_snapshot(max(height - 12, 5)), now,
                                                             width))
        return tui.render_console(self.state, now, width, height)

    async def draw_live(self) -> None:
        from rich.live import Live as RichLive
        drawn, last = -1, 0.0
        gap = 1 / MAX_FPS
        with RichLive(console=self.console, screen=True, auto_refresh=False, redirect_stdout=False,
                      redirect_stderr=False) as live:
            while not self.stop.is_set():
                now = time.time()
                if self.state.version != drawn or now - last >= 1.0:
                    drawn, last = self.state.version, now
                    started = time.perf_counter()
                    width, height = self.console.size
                    live.update(self.render(now, width, height), refresh=True)
                    # on a slow machine, drawing must not crowd out reading the stream
                    gap = max(1 / MAX_FPS, 3 * (time.perf_counter() - started))
                await self._sleep(gap)

    async def draw_plain(self) -> None:
        drawn = 0
        while not self.stop.is_set():
            # the log tail and heartbeats alone do not make a new snapshot worth printing
            if self.state.news != drawn:
                drawn = self.state.news
                self.print_plain()
            await self._sleep(PLAIN_EVERY)

    def print_plain(self) -> None:
        width = self.console.width
        height = _env_int("LINES", 24)
        capture = Console(width=width, height=height, record=True, color_system=None, file=open(os.devnull, "w"))
        capture.print(self.render(time.time(), width, height))
        text = "\n".join(line.rstrip() for line in capture.export_text().splitlines()).rstrip("\n")
        capture.file.close()
        print(text + "\n", flush=True)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        if self.once:
            await self.watch()
            if self.fatal is None:
                target = self.state.log_target() if self.view == "console" else None
                if target is not None:
                    self.state.log_start(target)
                    try:
                        await asyncio.wait_for(self._read_log(target), STREAM_IDLE)
                    except protocol.RemoteError as exc:
                        if exc.code == "not_found":
                            self.state.log_end(target, "not found")
                    except (net.PeerError, asyncio.TimeoutError):
                        pass
                self.print_plain()
            return
        tasks = [asyncio.ensure_future(self.watch())]
        if self.view == "console":
            tasks.append(asyncio.ensure_future(self.follow_log()))
        draw: Callable = self.draw_live if self.console.is_terminal else self.draw_plain
        try:
            await draw()
        finally:
            self.stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _env_int(name: str, default: int) -> int:
    try:
        return max(10, int(os.environ.get(name, "")))
    except ValueError:
        return default


def main(link, follow: int | None = None, view: str = "console", once: bool = False) -> int:
    """Run until Ctrl-C (or, with ``once``, print one snapshot). Returns the exit code."""
    console = Console()
    state = ConsoleState(link.addr, follow=follow)
    live = Live(link, state, console, view=view, once=once)
    try:
        asyncio.run(live.run())
    except KeyboardInterrupt:       # a Ctrl-C before the handlers were in place
        return 130
    if live.fatal:
        print(f"tinyci: {plain(live.fatal)}", file=sys.stderr)
        return 1
    return 0
