"""The ``notify.on_finish`` commands: shell commands the dispatcher runs when
a build ends (passed, failed, error, cancelled), e.g. to post to chat or
send mail. (Not ``tinyci notify``, the git hook's poke to the observer.)

Each runs in its own process group with ``TINYCI_BUILD``, ``TINYCI_STATUS``,
``TINYCI_SHA``, ``TINYCI_BRANCH``, ``TINYCI_JOB`` and ``TINYCI_LOG`` (the log
file's path) in its environment, and is killed after ``notify.timeout``
seconds. A failure is logged and changes nothing about the build.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

log = logging.getLogger(__name__)


def environment(build: dict, log_path: str, base: dict | None = None) -> dict:
    """The command's environment; the dispatcher's own TINYCI_* settings (a secret) are left out."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("TINYCI_")}
    env.update(TINYCI_BUILD=str(build["id"]), TINYCI_STATUS=build["status"], TINYCI_SHA=build["sha"],
               TINYCI_BRANCH=build["branch"], TINYCI_JOB=build.get("job") or "", TINYCI_LOG=log_path)
    return env


async def run(command: str, env: dict, timeout: float, what: str) -> int | None:
    """Run one command; returns its exit code, or None when it could not run or timed out."""
    try:
        proc = await asyncio.create_subprocess_shell(
            command, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        log.warning("notify command for %s could not start: %s", what, exc)
        return None
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        log.warning("notify command for %s killed after %gs: %s", what, timeout, command[:200])
        return None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        log.warning("notify command for %s exited %d: %s", what, proc.returncode, tail[0][:300])
    return proc.returncode
