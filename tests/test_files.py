"""Crash-safe writes and the exclusive directory lock (ci/files.py), on a real disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci.files import DirLock, LockedError, atomic_write


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_leftover_temporary_does_not_lend_its_permissions(tmp_path):
    target = tmp_path / "secret"
    leftover = tmp_path / "secret.tmp"
    leftover.write_text("half written before a crash")
    leftover.chmod(0o666)
    atomic_write(target, b"s3cret", mode=0o600)
    assert target.read_bytes() == b"s3cret"
    assert target.stat().st_mode & 0o777 == 0o600
    assert not leftover.exists()


def test_a_failed_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")          # fails inside the write
    assert target.read_text() == "old" and not (tmp_path / "state.json.tmp").exists()


def test_the_lock_is_exclusive_between_processes_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "work" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ci.files import DirLock; DirLock(sys.argv[1]).acquire(); "
                               "print('held', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as err:
            DirLock(path).acquire()
        assert str(path) in str(err.value)
        assert err.value.pid == holder.pid and f"pid {holder.pid}" in str(err.value)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    lock = DirLock(path)
    lock.acquire()              # the kernel released it when the holder died
    lock.release()
