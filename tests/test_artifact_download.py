"""`tinyci artifacts --get` on a blocking link: each chunk's bytes written to
the output as they arrive (``BlockingLink.stream(into=)``), spliced from the
socket by the kernel where Linux can (a plain socket to a file or pipe), else
received into the link's buffer and written (a file opened to append, TLS).
Both paths give the file byte for byte; a stall, a peer gone mid-chunk, a
chunk out of place and a file that cannot be written each fail as one error
of their own."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
import time

import pytest

from ci import blocking, net, protocol
from ci.artifact_download import copy_to

LIMITS = net.Limits(read_timeout=2.0, max_frame=4096, max_bulk=3 << 20)
# every byte value, over several chunks, one bigger than a splice's pipe, the last one short
BLOB = bytes(range(256)) * (29 * 1024) + b"tail"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class FileServer:
    """Answers read_artifact as the dispatcher does (Connection.send_file); ``short``
    announces that many bytes more than the file holds, ``stall`` sends half of the
    last chunk and then nothing, ``skip`` starts the second chunk past where the first ended."""

    def __init__(self, path, short=0, stall=False, skip=0):
        self.path, self.short, self.stall, self.skip = path, short, stall, skip

    async def __call__(self, conn, msg):
        with open(self.path, "rb", buffering=0) as file:
            size = file.seek(0, 2) + self.short
            await conn.send(protocol.ok(size=size))
            offset, first = 0, True
            while offset < size:
                count = min(conn.limits.max_bulk, size - offset)
                said = offset if first else offset + self.skip
                if self.stall and offset + count >= size:
                    conn.writer.write(protocol.bulk_header({"type": "chunk", "offset": said}, count)
                                      + os.pread(file.fileno(), count // 2, offset))
                    await asyncio.sleep(30)     # cancelled when the server closes
                await conn.send_file({"type": "chunk", "offset": said}, file, offset, count)
                offset += count
                first = False
            await conn.send({"type": "end", "offset": offset})


async def serve(handler, ssl=None):
    server = await net.serve(handler, "127.0.0.1", 0, limits=LIMITS, ssl=ssl)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def fetch(addr, out, ssl=None) -> tuple[int, bool]:
    """copy_to on a fresh link: (the size it says, whether it spliced)."""
    link = blocking.BlockingLink(addr, protocol.READER, "", LIMITS, ssl)
    try:
        size = copy_to(link, 1, "a.bin", out)
        return size, link._pipe is not None
    finally:
        link.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("flags, spliced", [(0, True), (os.O_APPEND, False)], ids=["file-spliced", "append-written"])
def test_a_download_into_a_file_is_byte_identical_spliced_or_written(tmp_path, flags, spliced):
    (tmp_path / "a.bin").write_bytes(BLOB)
    target = tmp_path / "got.bin"

    async def body():
        server, addr = await serve(FileServer(tmp_path / "a.bin"))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        try:
            assert await asyncio.to_thread(fetch, addr, fd) == (len(BLOB), spliced)
        finally:
            os.close(fd)
        server.close()
    run(body())
    assert digest(target.read_bytes()) == digest(BLOB)


def test_one_link_decides_for_each_stream_whether_its_file_is_spliced(tmp_path):
    (tmp_path / "a.bin").write_bytes(BLOB)

    def both(addr) -> list[bytes]:
        link = blocking.BlockingLink(addr, protocol.READER, "", LIMITS)
        got = []
        try:
            for flags in (0, os.O_APPEND, 0):       # spliced, then written, then spliced again
                path = tmp_path / f"got-{len(got)}.bin"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
                try:
                    assert copy_to(link, 1, "a.bin", fd) == len(BLOB)
                finally:
                    os.close(fd)
                got.append(path.read_bytes())
        finally:
            link.close()
        return got

    async def body():
        server, addr = await serve(FileServer(tmp_path / "a.bin"))
        got = await asyncio.to_thread(both, addr)
        server.close()
        return got
    assert [digest(data) for data in run(body())] == [digest(BLOB)] * 3


def test_a_download_into_a_pipe_is_spliced_and_byte_identical(tmp_path):
    (tmp_path / "a.bin").write_bytes(BLOB)
    read_end, write_end = os.pipe()
    got = bytearray()

    def drain():
        while piece := os.read(read_end, 1 << 16):
            got.extend(piece)
    reader = threading.Thread(target=drain)
    reader.start()

    async def body():
        server, addr = await serve(FileServer(tmp_path / "a.bin"))
        try:
            assert await asyncio.to_thread(fetch, addr, write_end) == (len(BLOB), True)
        finally:
            os.close(write_end)
        server.close()
    run(body())
    reader.join(10)
    os.close(read_end)
    assert digest(bytes(got)) == digest(BLOB)


def test_under_tls_the_bytes_are_received_and_written_not_spliced(tmp_path, pem):
    from ci import tls
    (tmp_path / "a.bin").write_bytes(BLOB)
    target = tmp_path / "got.bin"

    async def body():
        server, addr = await serve(FileServer(tmp_path / "a.bin"),
                                   ssl=tls.server_context(cert=pem["cert"], key=pem["key"]))
        with open(target, "wb") as out:
            assert await asyncio.to_thread(fetch, addr, out.fileno(), tls.client_context(
                ca=pem["ca"])) == (len(BLOB), False)
        server.close()
    run(body())
    assert digest(target.read_bytes()) == digest(BLOB)


@pytest.mark.parametrize("flags", [0, os.O_APPEND], ids=["spliced", "written"])
def test_a_peer_stalled_mid_chunk_is_given_up_within_read_timeout(tmp_path, flags):
    (tmp_path / "a.bin").write_bytes(BLOB)

    async def body():
        server, addr = await serve(FileServer(tmp_path / "a.bin", stall=True))
        fd = os.open(tmp_path / "got.bin", os.O_WRONLY | os.O_CREAT | flags, 0o644)
        started = time.monotonic()
        try:
            with pytest.raises(net.PeerTimeout, match="did not answer in time"):
                await asyncio.to_thread(fetch, addr, fd)
        finally:
            os.close(fd)
        server.close()
        return time.monotonic() - started
    waited = run(body())
    assert waited < 20      # the chunk's read_timeout (2 s) ended it, not a wait without end


@pytest.mark.parametrize("flags", [0, os.O_APPEND], ids=["spliced", "written"])
def test_a_peer_gone_mid_chunk_is_the_links_error(tmp_path, flags):
    (tmp_path / "a.bin").write_bytes(b"x" * 5000)

    async def body():
        server, addr = await serve(FileServer(tmp_path / "a.bin", short=10))
        fd = os.open(tmp_path / "got.bin", os.O_WRONLY | os.O_CREAT | flags, 0o644)
        try:
            with pytest.raises(net.PeerError, match="closed the connection"):
                await asyncio.to_thread(fetch, addr, fd)
        finally:
            os.close(fd)
        server.close()
    run(body())


@pytest.mark.parametrize("flags", [0, os.O_APPEND], ids=["spliced", "written"])
def test_a_chunk_out_of_place_is_refused_before_a_byte_of_it_is_written(tmp_path, flags):
    """A pipe (`tinyci artifacts N --get x | tar x`) cannot take bytes back: the
    misplaced chunk never reaches the output, only the chunk before it."""
    (tmp_path / "a.bin").write_bytes(BLOB)

    async def body():
        server, addr = await serve(FileServer(tmp_path / "a.bin", skip=7))
        fd = os.open(tmp_path / "got.bin", os.O_WRONLY | os.O_CREAT | flags, 0o644)
        try:
            with pytest.raises(protocol.ProtocolError, match=f"a chunk at offset {(3 << 20) + 7}, "
                                                             f"expected {3 << 20}"):
                await asyncio.to_thread(fetch, addr, fd)
        finally:
            os.close(fd)
        server.close()
    run(body())
    assert (tmp_path / "got.bin").read_bytes() == BLOB[:3 << 20]


@pytest.mark.parametrize("refuses", ["from the socket", "into the file"])
def test_a_kernel_or_file_system_that_refuses_to_splice_gets_the_bytes_written(tmp_path, monkeypatch, refuses):
    """splice refused (EINVAL: a file system without splice_write; a seccomp
    filter's EPERM): the rest of the download is received and written, byte
    for byte, and the link splices no more."""
    (tmp_path / "a.bin").write_bytes(BLOB)
    real = os.splice
    calls = []

    def splice(src, dst, count, *args, **kwargs):
        into_pipe = "flags" in kwargs       # the socket -> pipe half passes flags, the pipe -> file half none
        calls.append(into_pipe)
        if (refuses == "from the socket") == into_pipe and len(calls) > 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(src, dst, count, *args, **kwargs)
    monkeypatch.setattr(os, "splice", splice)

    def fetch_on(addr):
        link = blocking.BlockingLink(addr, protocol.READER, "", LIMITS)
        fd = os.open(tmp_path / "got.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            return copy_to(link, 1, "a.bin", fd), link._no_splice
        finally:
            os.close(fd)
            link.close()

    async def body():
        server, addr = await serve(FileServer(tmp_path / "a.bin"))
        got = await asyncio.to_thread(fetch_on, addr)
        server.close()
        return got
    assert run(body()) == (len(BLOB), True)
    assert digest((tmp_path / "got.bin").read_bytes()) == digest(BLOB)


def test_a_file_that_cannot_be_written_is_the_files_error_not_the_links(tmp_path):
    (tmp_path / "a.bin").write_bytes(BLOB)
    (tmp_path / "got.bin").write_bytes(b"")

    async def body():
        server, addr = await serve(FileServer(tmp_path / "a.bin"))
        fd = os.open(tmp_path / "got.bin", os.O_RDONLY)     # a regular file, not open for writing
        try:
            with pytest.raises(OSError) as raised:
                await asyncio.to_thread(fetch, addr, fd)
        finally:
            os.close(fd)
        server.close()
        return raised.value
    exc = run(body())
    assert not isinstance(exc, net.PeerError) and exc.errno == 9      # EBADF, as os.write would say
