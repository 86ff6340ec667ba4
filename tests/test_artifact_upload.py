"""One artifact sent in chunks (raw bytes in bulk frames, each within the
bulk limit, the last marked eof) to a fake dispatcher in this process, sent
again from its start when the connection is lost, and a refusal reported."""

from __future__ import annotations

import asyncio
import os

import pytest

from ci import artifact_upload

from runner_support import FakeDispatcher


def test_upload_sends_a_file_in_chunks_and_reports_a_refusal(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")

    async def scenario():
        fake = await FakeDispatcher().start()
        client = fake.client()
        try:
            await artifact_upload.upload(client, 4096, 5, 2, "dist/big.bin", tmp_path / "big.bin")
            chunks = [m for m in fake.artifacts if m["path"] == "dist/big.bin"]
            assert len(chunks) == 3, "the bulk limit bounds a chunk"
            assert [m["offset"] for m in chunks] == [0, 4096, 8192]
            assert [m["eof"] for m in chunks] == [False, False, True]
            assert {(m["build"], m["attempt"]) for m in chunks} == {(5, 2)}
            assert b"".join(m["data"] for m in chunks) == data         # the bytes as they are
            await artifact_upload.upload(client, 4096, 5, 2, "empty", tmp_path / "empty")
            assert [(m["offset"], m["data"], m["eof"]) for m in fake.artifacts if m["path"] == "empty"] \
                == [(0, b"", True)]
            fake.refuse_artifacts = "artifact over the limit"
            with pytest.raises(ValueError, match="the dispatcher refused it: artifact over the limit"):
                await artifact_upload.upload(client, 4096, 5, 2, "dist/big.bin", tmp_path / "big.bin")
        finally:
            await client.close()
            fake.close()

    asyncio.run(scenario())


def test_a_connection_lost_mid_upload_sends_the_artifact_again_from_its_start(tmp_path):
    data = os.urandom(20_000)
    (tmp_path / "big.bin").write_bytes(data)

    async def scenario():
        fake = await FakeDispatcher().start()
        fake.drop_artifact_at = 8192
        client = fake.client()
        try:
            await artifact_upload.upload(client, 4096, 5, 2, "big.bin", tmp_path / "big.bin")
            offsets = [m["offset"] for m in fake.artifacts]
            again = offsets.index(0, 1)         # the second start
            assert offsets[:again][-1] == 8192 and offsets[again:] == [0, 4096, 8192, 12288, 16384]
            assert b"".join(m["data"] for m in fake.artifacts[again:]) == data
            assert [m["eof"] for m in fake.artifacts[again:]] == [False] * 4 + [True]
        finally:
            await client.close()
            fake.close()

    asyncio.run(scenario())
