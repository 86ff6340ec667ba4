"""Which files the artifact globs select: never through a symlink, never .git,
in order within the byte limit, with notes on what was left out."""

from __future__ import annotations

import os

from ci import artifact_find


def test_find_selects_files_in_order_within_the_limit(tmp_path):
    root = tmp_path / "checkout"
    (root / "out" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("secret-ish\n")
    (root / "out" / "a.txt").write_text("a" * 10)
    (root / "out" / "b.txt").write_text("b" * 30)
    (root / "out" / "deep" / "c.log").write_text("c" * 5)
    (root / "report.xml").write_text("r" * 20)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the build's\n")
    os.symlink(outside, root / "link.txt")
    os.symlink(root / "out", root / "linked-dir")

    files, notes = artifact_find.find(root, ("out", "report.xml", "link.txt",
                                               "linked-dir/*", ".git/*", "nothing/*"), 35)
    assert [(rel, size) for rel, _, size in files] == [("out/a.txt", 10), ("out/deep/c.log", 5),
                                                       ("report.xml", 20)]
    assert all(path == root.resolve() / rel for rel, path, _ in files)
    assert notes == [
        "link.txt: a symlink (or inside one); not sent",
        "linked-dir/a.txt: a symlink (or inside one); not sent",
        "linked-dir/b.txt: a symlink (or inside one); not sent",
        "linked-dir/deep: a symlink (or inside one); not sent",
        ".git/*: matched nothing",
        "nothing/*: matched nothing",
        "out/b.txt: 30 bytes would exceed the 35-byte artifact limit; not sent",
    ]
