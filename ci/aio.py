"""Small asyncio helpers every daemon and tool shares: a timeout that never
swallows a cancel, blocking work in a daemon thread, and reconnect backoff.

``asyncio`` itself is imported at first use: `tinyci notify` runs inside every
git commit's hook and uses none of this.
"""

from __future__ import annotations

import importlib
import queue
import sys
import threading

TYPE_CHECKING = False   # typing.TYPE_CHECKING without importing typing (~10 ms of every tool's start)
if TYPE_CHECKING:
    from typing import Any, Awaitable, Callable


class Lazy:
    """Stands for module ``module`` in a module's globals (as ``name``) until
    first used, then replaces itself there with the real module, or with what
    ``make`` makes of it (a logger). `tinyci notify` runs inside every git
    commit's hook and needs only ``blocking.request_blocking``: importing asyncio
    (or logging) would cost it some 40 ms a commit. The dispatcher needs
    GitPython only to resolve a revision for `trigger`: importing it at start
    cost some 60 ms and 100 modules' memory."""

    def __init__(self, namespace: dict, module: str, name: str = "", make: Callable[[Any], Any] | None = None):
        self._namespace, self._module, self._name, self._make = namespace, module, name or module, make

    def __getattr__(self, attr: str) -> Any:
        value = importlib.import_module(self._module)
        if self._make is not None:
            value = self._make(value)
        self._namespace[self._name] = value     # later lookups skip this proxy
        return getattr(value, attr)


asyncio: Any = Lazy(globals(), "asyncio")
# only Backoff uses it (a daemon reconnecting, `console`, `wait`): a tool that asks once need not import it (~2 ms)
random: Any = Lazy(globals(), "random")



if sys.version_info >= (3, 11):
    async def within(aw: Awaitable, timeout: float | None) -> Any:
        """``asyncio.wait_for`` without its flaw before Python 3.12: a cancel that
        lands just as the inner await completes is swallowed there, so a daemon
        told to stop could hang on a connection whose reply arrived at that moment."""
        async with asyncio.timeout(timeout):
            return await aw
else:  # 3.10 has no asyncio.timeout; it keeps the flaw
    async def within(aw: Awaitable, timeout: float | None) -> Any:
        return await asyncio.wait_for(aw, timeout)


class _Workers:
    """Daemon threads for ``in_thread``, kept for the next call once their work
    is done (up to ``keep`` idle ones). A thread started per call cost the
    runner a fifth of its loop: ``Thread.start`` waits until the new thread
    runs, and on a busy machine that is a scheduler's round. Daemon threads,
    so a long git command never holds up the process's exit."""

    def __init__(self, keep: int = 8):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.keep = keep
        self.idle = 0               # threads waiting for a job, or about to
        self.lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self.lock:
            start = not self.idle
            if not start:
                self.idle -= 1
        if start:       # a new thread runs this job first: should it fail to start, nothing is queued
            threading.Thread(target=self._work, args=(job,), name="tinyci-worker", daemon=True).start()
        else:
            self.jobs.put(job)

    def _work(self, job: Callable[[], None]) -> None:
        while True:
            job()
            with self.lock:
                if self.idle >= self.keep:
                    return
                self.idle += 1
            job = self.jobs.get()


# one set of worker threads for the process, whichever loop asks: like the
# threads themselves, it holds nothing of any loop's between jobs
_workers = _Workers()


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking ``fn`` in a daemon thread (one kept from an earlier call if idle).

    Not asyncio.to_thread: the default executor is joined when the loop
    ends, so a long git command would hold up Ctrl-C until it finished.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(value)

    def work() -> None:
        threading.current_thread().name = f"tinyci-{getattr(fn, '__name__', 'work')}"     # for py-spy, a traceback
        try:
            value, exc = fn(*args), None
        except BaseException as error:  # handed to the awaiting task
            value, exc = None, error
        try:
            loop.call_soon_threadsafe(settle, value, exc)
        except RuntimeError:
            pass                        # the loop is gone: nobody waits any more

    _workers.submit(work)
    return await future


class Backoff:
    """Capped exponential backoff with full jitter: peers restarted together
    do not all come back at the same instant. ``next()`` gives the next pause."""

    def __init__(self, start: float = 0.1, cap: float = 3.0):
        self.start, self.cap, self.tries = start, cap, 0

    def next(self) -> float:
        ceiling = min(self.cap, self.start * 2 ** min(self.tries, 30))
        self.tries += 1
        return random.uniform(0, ceiling)

    def reset(self) -> None:
        self.tries = 0
