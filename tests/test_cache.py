"""ci/cache.py without daemons: keys, restore and save, atomic saves, the cap and LRU eviction."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ci import cache
from ci.buildfile import CacheSpec
from ci.cache import Cache, CacheError, compute_key


def checkout(tmp: Path, name: str = "co") -> Path:
    root = tmp / name
    (root / "deps").mkdir(parents=True)
    (root / "requirements.txt").write_text("click\n")
    return root


def test_the_key_follows_the_key_files_content_the_job_and_the_paths(tmp_path):
    root = checkout(tmp_path)
    spec = CacheSpec(("deps",), ("requirements*.txt",))
    first = compute_key(root, spec, "test")
    assert first == compute_key(root, spec, "test")
    assert first != compute_key(root, spec, "lint")
    assert first != compute_key(root, CacheSpec(("deps", "~/.cache/pip"), spec.key), "test")
    (root / "requirements.txt").write_text("click\nrich\n")
    assert compute_key(root, spec, "test") != first
    (root / "requirements-dev.txt").write_text("pytest\n")
    assert compute_key(root, spec, "test") != compute_key(root, CacheSpec(("deps",), ("requirements.txt",)), "test")


def test_a_miss_then_a_save_then_a_hit_restores_files_in_the_checkout_and_under_home(tmp_path):
    c = Cache(tmp_path / "cache", 1 << 20)
    home = tmp_path / "home"
    root = checkout(tmp_path)
    spec = CacheSpec(("deps", "~/.tool", "missing"), ())
    key, lines = cache.restore_lines(c, spec, root, "", str(home))
    assert lines == [f"cache: miss {key}"]
    (root / "deps" / "lib.py").write_text("x = 1\n")
    os.symlink("lib.py", root / "deps" / "link.py")
    (home / ".tool").mkdir(parents=True)
    (home / ".tool" / "state").write_text("warm")
    saved = cache.save_lines(c, spec, key, root, str(home))
    assert saved[0].startswith(f"cache: saved {key} (")
    assert not list((tmp_path / "cache").glob(".tmp-*"))

    other = checkout(tmp_path, "co2")
    (home / ".tool" / "state").unlink()
    key2, lines = cache.restore_lines(c, spec, other, "", str(home))
    assert key2 == key and lines[0].startswith(f"cache: hit {key} (2 path(s)")
    assert (other / "deps" / "lib.py").read_text() == "x = 1\n"
    assert os.readlink(other / "deps" / "link.py") == "lib.py"
    assert (home / ".tool" / "state").read_text() == "warm"
    # a copy, not a link: changing what was restored leaves the cache as it was
    (other / "deps" / "lib.py").write_text("changed\n")
    assert (tmp_path / "cache" / key / "data" / "0" / "lib.py").read_text() == "x = 1\n"
    assert cache.save_lines(c, spec, key, other, str(home)) == [f"cache: {key} is already saved; kept as it is"]


def test_a_half_written_save_is_never_restored_and_is_swept_at_start(tmp_path):
    root_dir = tmp_path / "cache"
    c = Cache(root_dir, 1 << 20)
    half = root_dir / ".tmp-deadbeef"
    (half / "data" / "0").mkdir(parents=True)
    (half / "data" / "0" / "partial").write_text("x")
    key = compute_key(checkout(tmp_path), CacheSpec(("deps",)), "")
    assert c.restore(key, ("deps",), tmp_path / "co", None) == [f"cache: miss {key}"]
    assert c.used() == 0
    Cache(root_dir, 1 << 20)          # a runner starting again
    assert not half.exists()


def test_two_slots_saving_one_key_at_once_leave_one_whole_entry(tmp_path):
    c = Cache(tmp_path / "cache", 10 << 20)
    roots = [checkout(tmp_path, f"co{n}") for n in range(4)]
    for n, root in enumerate(roots):
        for i in range(200):
            (root / "deps" / f"f{i}").write_text(f"{i}\n")
    spec = CacheSpec(("deps",))
    key = compute_key(roots[0], spec, "")
    lines: list = []
    threads = [threading.Thread(target=lambda r=r: lines.extend(c.save(key, spec.paths, r, None))) for r in roots]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(line.startswith("cache: saved") for line in lines) == 1, lines
    assert [e[2].name for e in c.entries()] == [key]
    assert sorted(p.name for p in (tmp_path / "cache" / key / "data" / "0").iterdir()) == sorted(
        f"f{i}" for i in range(200))
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_the_least_recently_used_entry_goes_at_the_cap_and_one_too_big_is_not_saved(tmp_path):
    c = Cache(tmp_path / "cache", 2500)
    root = checkout(tmp_path)
    spec = CacheSpec(("deps",), ("requirements.txt",))
    keys = []
    for n in range(3):
        (root / "requirements.txt").write_text(f"v{n}\n")
        (root / "deps" / "blob").write_bytes(b"x" * 1000)
        key = compute_key(root, spec, "")
        keys.append(key)
        lines = c.save(key, spec.paths, root, None)
        assert lines[0] == f"cache: saved {key} (0.0 MiB)"
        if n == 1:          # the first used again: the second becomes the least recently used
            assert c.restore(keys[0], spec.paths, checkout(tmp_path, "other"), None)[0].startswith("cache: hit")
    assert "evicted 1 least recently used entry" in lines[1]
    assert sorted(e[2].name for e in c.entries()) == sorted([keys[0], keys[2]])
    assert c.used() <= 2500
    (root / "deps" / "blob").write_bytes(b"x" * 3000)
    assert c.save("k" * 20, spec.paths, root, None) == [
        "cache: not saved: over runner.cache_bytes (0.0 MiB > 0.0 MiB)"]


def test_a_path_through_a_symlink_out_of_the_checkout_is_refused(tmp_path):
    root = checkout(tmp_path)
    os.symlink(tmp_path, root / "escape")
    with pytest.raises(CacheError, match="symlink"):
        cache.place("escape/x", root, None)
    with pytest.raises(CacheError, match="HOME"):
        cache.place("~/.cache/pip", root, None)


def test_no_cache_when_the_cap_is_zero(tmp_path):
    key, lines = cache.restore_lines(Cache(tmp_path / "c", 0), CacheSpec(("deps",)), checkout(tmp_path), "", None)
    assert key is None and lines == ["cache: off on this runner (runner.cache_bytes is 0)"]
    assert not (tmp_path / "c").exists()
