"""Which files of a checkout a ``.ci.yaml``'s ``artifacts`` globs select, to
be sent to the dispatcher after the steps (``artifact_upload.py`` sends them).

Only regular files inside the checkout, never through a symlink (a link could
point anywhere on the runner), never ``.git``, within the byte limit the
dispatcher gave; what is left out is said in notes for the build log.
"""

from __future__ import annotations

from pathlib import Path


def find(root: Path, patterns: tuple, limit: int,
         say_unmatched: bool = True) -> tuple[list[tuple[str, Path, int]], list[str]]:
    """Regular files inside ``root`` matching ``patterns``, as (relative path, path,
    size), in order, within ``limit`` bytes in all; and notes on what was left out.
    Symlinks are never followed: a link could point anywhere on the runner.
    ``say_unmatched`` False: a glob matching nothing is not noted (the top level's
    globs in a file of several jobs: it may name another job's files)."""
    root = root.resolve()
    found: dict[str, tuple[Path, int]] = {}
    notes = []
    for pattern in patterns:
        matched = False
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if rel in found or rel.split("/")[0] == ".git":
                continue
            matched = True
            if any(p.is_symlink() for p in [path, *path.parents] if root in p.parents):
                notes.append(f"{rel}: a symlink (or inside one); not sent")
                continue
            if path.is_dir():
                for inner in sorted(path.rglob("*")):
                    if inner.is_file() and not inner.is_symlink() and not any(
                            p.is_symlink() for p in inner.parents if root in p.parents):
                        found.setdefault(inner.relative_to(root).as_posix(), (inner, inner.stat().st_size))
            elif path.is_file():
                found[rel] = (path, path.stat().st_size)
        if not matched and say_unmatched:
            notes.append(f"{pattern}: matched nothing")
    chosen, total = [], 0
    for rel, (path, size) in found.items():
        if total + size > limit:
            notes.append(f"{rel}: {size} bytes would exceed the {limit}-byte artifact limit; not sent")
            continue
        total += size
        chosen.append((rel, path, size))
    return chosen, notes
