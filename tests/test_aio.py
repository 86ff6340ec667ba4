"""The small asyncio helpers: a timeout that never swallows a cancel, blocking
work in a daemon thread, reconnect backoff, and asyncio imported only when used."""

import asyncio
import random
import subprocess
import sys
import threading

import pytest

from ci import aio

from conftest import ROOT


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_within_returns_the_result_or_times_out():
    async def body():
        assert await aio.within(asyncio.sleep(0, "done"), 5) == "done"
        with pytest.raises(asyncio.TimeoutError):
            await aio.within(asyncio.Event().wait(), 0.01)
        assert await aio.within(asyncio.sleep(0, "no limit"), None) == "no limit"
    run(body())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 keeps asyncio.wait_for's flaw (see aio.within)")
def test_within_does_not_swallow_a_cancel_that_lands_as_the_result_arrives():
    async def body():
        reply = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(aio.within(reply, 10))
        await asyncio.sleep(0)          # the task now waits for the reply
        reply.set_result("a reply")     # which arrives...
        task.cancel()                   # ...just as the daemon is told to stop
        with pytest.raises(asyncio.CancelledError):
            await task
    run(body())


def test_in_thread_runs_in_a_daemon_thread_while_the_loop_goes_on():
    async def body():
        loop_ran = threading.Event()

        def blocking(x):
            assert loop_ran.wait(5), "the event loop was blocked"
            thread = threading.current_thread()
            return x * 2, thread.name, thread.daemon

        work = asyncio.ensure_future(aio.in_thread(blocking, 21))
        await asyncio.sleep(0)
        loop_ran.set()                  # only the loop, running meanwhile, lets the work finish
        assert await work == (42, "tinyci-blocking", True)

        def broken():
            raise OSError("disk on fire")
        with pytest.raises(OSError, match="disk on fire"):
            await aio.in_thread(broken)
    run(body())


def test_in_thread_keeps_its_threads_and_grows_for_work_that_waits_on_other_work():
    async def body():
        await aio.in_thread(threading.current_thread)
        there = set(threading.enumerate())
        assert await aio.in_thread(threading.current_thread) in there   # a kept thread, not one started anew
        # twelve at once, each waiting for all the others: they must all run at the same time
        gate = threading.Barrier(12, timeout=10)
        idents = await asyncio.gather(*(aio.in_thread(lambda: (gate.wait(), threading.get_ident())[1])
                                        for _ in range(12)))
        assert len(set(idents)) == 12
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("tinyci-"))
    run(body())


def test_backoff_grows_to_its_cap_with_full_jitter_and_resets():
    random.seed(7)
    backoff = aio.Backoff(start=0.1, cap=1.0)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    pauses = [backoff.next() for _ in ceilings]
    assert all(0 <= p <= c for p, c in zip(pauses, ceilings))
    assert len(set(pauses)) == len(pauses)          # jittered, not a fixed schedule
    assert max(aio.Backoff(0.1, 1.0).next() for _ in range(200)) <= 0.1
    backoff.reset()
    assert backoff.tries == 0 and backoff.next() <= 0.1
    long = aio.Backoff(0.1, 3.0)
    long.tries = 10_000                            # no overflow after a very long outage
    assert 0 <= long.next() <= 3.0


def test_lazy_asyncio_replaces_itself_with_the_module_at_first_use():
    namespace = {}
    namespace["asyncio"] = aio.Lazy(namespace, "asyncio")
    assert namespace["asyncio"].sleep is asyncio.sleep
    assert namespace["asyncio"] is asyncio


def test_importing_aio_protocol_and_net_does_not_import_asyncio():
    """`tinyci notify` runs in every commit's hook: it must not pay for asyncio."""
    code = "import sys, ci.aio, ci.protocol, ci.net; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_a_lazy_module_under_another_name_replaces_itself_at_first_use():
    import gitdb.exc
    namespace = {}
    namespace["gitdb_exc"] = aio.Lazy(namespace, "gitdb.exc", "gitdb_exc")
    assert namespace["gitdb_exc"].ODBError is gitdb.exc.ODBError
    assert namespace["gitdb_exc"] is gitdb.exc


def test_the_dispatcher_starts_without_gitpython_and_resolves_revisions_with_it():
    """GitPython is some 100 modules: the dispatcher needs it only for `trigger` and `rebuild`."""
    code = ("import sys, ci.dispatcher, ci.triggers; print('git' in sys.modules); "
            f"ci.triggers.gitops.resolve({str(ROOT)!r}, 'HEAD'); print('git' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.stdout.split() == ["False", "True"], out.stderr
