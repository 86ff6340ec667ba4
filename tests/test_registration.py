"""Staying registered, against a fake dispatcher in this process: the first
registration, another when the pings stop, and an absent dispatcher reported
once however many times it is retried."""

from __future__ import annotations

import asyncio
from typing import Callable

import pytest

from ci import net, protocol
from ci.registration import Registration

from conftest import free_port
from runner_support import SECRET, FakeDispatcher, wait_until


def messages(leases: list) -> Callable[[], dict]:
    def message() -> dict:
        return {"type": "register", "name": "r1", "host": "127.0.0.1", "port": 8889,
                "labels": ["linux"], "slots": 2, "running": [list(lease) for lease in leases]}
    return message


@pytest.mark.slow     # real processes and timeouts of a second or more
def test_registers_and_again_when_the_pings_stop(caplog):
    caplog.set_level("INFO", logger="ci.registration")
    leases = []

    async def scenario():
        fake = await FakeDispatcher(heartbeat=0.1).start()
        registration = Registration(fake.client(), messages(leases))
        task = asyncio.ensure_future(registration.run())
        try:
            await wait_until(lambda: fake.registers, "the first registration")
            assert fake.registers[0]["running"] == []
            leases.append((4, 1))
            # nobody pings it: it takes itself for forgotten and registers again, leases as they are now
            await wait_until(lambda: len(fake.registers) >= 2, "a second registration")
            assert fake.registers[1]["running"] == [[4, 1]]
            assert f"registered with the dispatcher at 127.0.0.1:{fake.port} as r1 (2 slot(s), 0 lease(s) held)" \
                in caplog.text
            assert "no ping from the dispatcher" in caplog.text
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await registration.close()
            fake.close()

    asyncio.run(scenario())


def test_an_absent_dispatcher_is_reported_once_and_retried(caplog):
    port = free_port()

    async def scenario():
        tries = []

        def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            tries.append(1)
            writer.close()

        away = await asyncio.start_server(hang_up, "127.0.0.1", port)
        registration = Registration(net.Client("127.0.0.1", port, protocol.RUNNER, SECRET, id="r1"),
                                    messages([(3, 1)]))
        task = asyncio.ensure_future(registration.run())
        fake = FakeDispatcher()
        try:
            await wait_until(lambda: len(tries) >= 3, "three tries")
            # one line about it, however many retries
            assert caplog.text.count("cannot register") == 1, caplog.text
            assert f"cannot register with the dispatcher at 127.0.0.1:{port}" in caplog.text
            away.close()
            await away.wait_closed()
            await fake.start(port)
            await wait_until(lambda: fake.registers, "the registration once the dispatcher is back")
            assert fake.registers[0]["running"] == [[3, 1]]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await registration.close()
            fake.close()

    asyncio.run(scenario())
