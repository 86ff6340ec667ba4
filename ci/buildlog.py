"""The log file of one build attempt on a runner, as the steps and the runner
write it: UTF-8, flushed on every write so the outbox's ``Delivery`` can
send it while it grows, and synced to disk when the attempt ends (the outbox
entry written next promises every byte of it). A big log is also synced
behind the writer every SYNC_EVERY bytes, in a thread, so that the sync at
the end, which the result waits for, has only the rest to write.

With ``mask`` set (a ``masking.Masker`` of the attempt's build secrets),
every value is replaced by ``***`` before it reaches the file, even one
written in two pieces; what the masker holds back (a possible start of a
value) goes out at the next line of the runner's own, which ends the step's
output, or at ``close``.
"""

from __future__ import annotations

import codecs
import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

SYNC_EVERY = 8 << 20        # bytes written between two syncs behind the writer (``_sync_behind``)
PIPE_SIZE = 1 << 20         # Linux's default pipe-max-size: what an unprivileged process may ask for


def widen_pipe(transport: Any) -> None:
    """Make the step's output pipe (a subprocess transport's stdout) hold up to
    PIPE_SIZE bytes instead of 64 KiB: a step that writes fast then goes on
    while the runner's loop is busy (sending a log frame, on a loaded
    machine) rather than stopping every 64 KiB. Best effort: where the
    system refuses, the pipe stays as it was."""
    try:
        pipe = transport.get_pipe_transport(1).get_extra_info("pipe")
        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except (AttributeError, OSError, ValueError):
        pass


class BuildLog:
    """The attempt's log file; ``on_write`` is called after every write (it wakes the sender)."""

    def __init__(self, path: Path, on_write: Callable[[], None] = lambda: None):
        self.path = path
        self.size = 0
        self._on_write = on_write
        self._file: Any = open(path, "wb")
        self._line_start = True
        self.mask: Any = None           # a masking.Masker, or None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._synced = 0                # the size when the last sync behind began
        self._syncing = False

    def feed(self, data: bytes) -> None:
        """A piece of the step's output as it came: text as ``write`` takes it,
        a character cut between two pieces decoded whole, bytes that are not
        UTF-8 replaced. A piece of ASCII (most output is) while no character
        is half read is written as it is: decoding and encoding it again gave
        the same bytes, at two copies of each."""
        if data.isascii() and not self._decoder.getstate()[0]:
            if data and self._file is not None:
                self._write(self.mask.feed(data) if self.mask else data)
                self._line_start = data.endswith(b"\n")
            return
        self.write(self._decoder.decode(data))

    def feed_end(self) -> None:
        """The step's output ended: what ``feed`` held of a character cut short."""
        self.write(self._decoder.decode(b"", final=True))

    def write(self, text: str) -> None:
        if not text or self._file is None:
            return
        data = text.encode("utf-8", "replace")
        if self.mask:
            data = self.mask.feed(data)
        self._write(data)
        self._line_start = text.endswith("\n")

    def _write(self, data: bytes) -> None:
        if not data or self._file is None:
            return
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            # a full disk must not kill the build; the log simply stops here
            log.error("cannot write build log %s: %s; the rest of this log is lost", self.path, exc)
            self._file = None
            return
        self.size += len(data)
        if self.size - self._synced >= SYNC_EVERY and not self._syncing:
            self._sync_behind()
        self._on_write()

    def _sync_behind(self) -> None:
        """Sync what is written so far in a thread of its own, while the step
        goes on: the sync at ``close`` then has only the rest. It is on the
        build's path (the result waits for it): 0.2 s for a 100 MiB log here."""
        try:
            fd = os.dup(self._file.fileno())    # its own: the log may be closed meanwhile
        except OSError:
            return
        self._syncing, self._synced = True, self.size

        def sync() -> None:
            try:
                getattr(os, "fdatasync", os.fsync)(fd)
            except OSError:
                pass            # close's own sync reports a failure
            finally:
                os.close(fd)
                self._syncing = False
        threading.Thread(target=sync, name="log-sync", daemon=True).start()

    def line(self, text: str) -> None:
        """Write one line of our own, starting it on a fresh line."""
        if self.mask:
            self._write(self.mask.flush())
        self.write(("" if self._line_start else "\n") + text + "\n")

    def close(self) -> None:
        if self._file is None:
            return
        if self.mask:
            self._write(self.mask.flush())
        try:
            self._file.flush()
            os.fsync(self._file.fileno())   # the outbox entry written next promises this log
        except OSError as exc:
            log.error("cannot sync build log %s: %s", self.path, exc)
        self._file.close()
        self._file = None
