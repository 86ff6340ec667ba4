"""`tinyci install-hook`: git hooks that poke the observer, keep a hook that
was already there, and install twice without harm; end to end, a commit is
built long before the observer's next poll."""

import os
import subprocess

from conftest import GIT_ENV, Repo, finished, free_port, tinyci

OLD_HOOK = '#!/bin/sh\necho "old hook ran" >> "$(git rev-parse --git-dir)/../old-hook.txt"\n'


def commit(repo: Repo, message: str, **extra_env: str) -> subprocess.CompletedProcess:
    # a committing shell without tinyci on PATH and without our PYTHONPATH
    env = {"PATH": "/usr/bin:/bin", "HOME": str(repo.path), **GIT_ENV, **extra_env}
    return subprocess.run(["git", "-C", str(repo.path), "commit", "-q", "--allow-empty", "-m", message],
                          capture_output=True, text=True, env=env, timeout=60)


def test_install_keeps_an_existing_hook_and_is_idempotent(tmp_path):
    repo = Repo(tmp_path / "repo")
    hooks = tmp_path / "repo" / ".git" / "hooks"
    (hooks / "post-commit").write_text(OLD_HOOK)
    (hooks / "post-commit").chmod(0o755)
    addr = f"127.0.0.1:{free_port()}"

    first = tinyci("install-hook", "--repo", str(repo.path), "--observer", addr)
    assert first.returncode == 0, first.stderr
    assert "post-commit.before-tinyci" in first.stdout
    installed = {name: (hooks / name).read_text() for name in ("post-commit", "post-receive")}
    second = tinyci("install-hook", "--repo", str(repo.path), "--observer", addr)
    assert second.returncode == 0, second.stderr
    assert {name: (hooks / name).read_text() for name in installed} == installed
    assert (hooks / "post-commit.before-tinyci").read_text() == OLD_HOOK     # kept, not clobbered
    assert not (hooks / "post-receive.before-tinyci").exists()
    assert all(os.access(hooks / name, os.X_OK) for name in installed)

    # nothing listens at the address: the commit still succeeds, the old hook ran
    # exactly once, and notify said in one line why it could not poke
    done = commit(repo, "with hooks")
    assert done.returncode == 0, done.stderr
    assert (repo.path / "old-hook.txt").read_text() == "old hook ran\n"
    assert "cannot reach the observer at " + addr in done.stderr


def test_post_receive_hook_runs_on_push(tmp_path):
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True, timeout=30)
    addr = f"127.0.0.1:{free_port()}"
    done = tinyci("install-hook", "--repo", str(bare), "--observer", addr)
    assert done.returncode == 0, done.stderr
    assert (bare / "hooks" / "post-receive").exists()
    work = Repo(tmp_path / "work")
    work.commit("first")
    push = subprocess.run(["git", "-C", str(work.path), "push", "-q", str(bare), "main"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **GIT_ENV})
    assert push.returncode == 0, push.stderr
    assert "cannot reach the observer at " + addr in push.stderr


def test_install_hook_outside_a_repository_is_one_line(tmp_path):
    done = tinyci("install-hook", "--repo", str(tmp_path), "--observer", "127.0.0.1:1")
    assert done.returncode == 1
    assert done.stderr.strip() == f"tinyci install-hook: {tmp_path} is not a git repository"


def test_commit_with_the_hook_is_built_long_before_the_next_poll(cluster, repo):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    obs = c.observer(repo, "--interval", "30")
    c.wait_builds(lambda b: len(b) == 1 and finished(b), "the initial commit (the observer's first scan)")
    done = tinyci("install-hook", "--repo", str(repo.path), "--observer", obs.addr)
    assert done.returncode == 0, done.stderr
    out = commit(repo, "poked, not polled")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    sha = repo.head()
    # the next poll is 30 s away: only the poke can make this happen within 15 s
    builds = c.wait_builds(lambda b: any(x["sha"] == sha and finished([x]) for x in b),
                           "the hooked commit to be built", timeout=15)
    assert next(b for b in builds if b["sha"] == sha)["status"] == "passed"


def test_hook_installed_where_tinyci_up_ran_uses_its_secret(cluster, repo, tmp_path):
    # `tinyci up` keeps its generated secret in ./.tinyci/secret; the hook runs inside
    # the clone, elsewhere, so install-hook must point it at that file
    secret = "s3cret-made-by-up"
    c = cluster()
    c.env["TINYCI_AUTH_SECRET"] = secret
    c.dispatcher()
    c.runner("r1")
    obs = c.observer(repo, "--interval", "30")
    c.wait_builds(lambda b: len(b) == 1 and finished(b), "the initial commit")
    where_up_ran = tmp_path / "up-dir"
    (where_up_ran / ".tinyci").mkdir(parents=True)
    (where_up_ran / ".tinyci" / "secret").write_text(secret + "\n")
    done = tinyci("install-hook", "--repo", str(repo.path), "--observer", obs.addr, cwd=where_up_ran)
    assert done.returncode == 0, done.stderr
    # any TINYCI_ setting in the committing shell makes notify read the configuration:
    # the secret file the hook names must still win
    out = commit(repo, "poked with the secret", TINYCI_NET_READ_TIMEOUT="5")
    assert out.returncode == 0 and "refused" not in out.stderr and "authentication" not in out.stderr, out.stderr
    sha = repo.head()
    c.wait_builds(lambda b: any(x["sha"] == sha and finished([x]) for x in b),
                  "the hooked commit to be built (the poke was accepted)", timeout=15)


def test_a_pull_a_merge_and_a_reset_are_seen_long_before_the_next_poll(cluster, repo, tmp_path):
    c = cluster()
    c.dispatcher()
    c.runner("r1")
    obs = c.observer(repo, "--interval", "30")
    c.wait_builds(lambda b: len(b) == 1 and finished(b), "the initial commit (the observer's first scan)")
    done = tinyci("install-hook", "--repo", str(repo.path), "--observer", obs.addr)
    assert done.returncode == 0 and "reference-transaction" in done.stdout, done.stdout + done.stderr
    upstream = tmp_path / "upstream"
    subprocess.run(["git", "clone", "-q", str(repo.path), str(upstream)], check=True, timeout=60)
    other = Repo.__new__(Repo)
    other.path, other.env = upstream, {**os.environ, **GIT_ENV}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **GIT_ENV}

    def git(*args: str) -> None:
        out = subprocess.run(["git", "-C", str(repo.path), *args], capture_output=True, text=True, env=env,
                             timeout=60)
        assert out.returncode == 0 and out.stderr == "", out.stderr

    def built_soon(sha: str, how: str) -> None:
        # the next poll is 30 s away: only a hook's poke can make this happen within 15 s
        c.wait_builds(lambda b: any(x["sha"] == sha and finished([x]) for x in b), f"{how}, built", timeout=15)

    pulled = other.commit("upstream work")
    git("pull", "-q", "--ff-only", str(upstream), "main")           # post-merge / reference-transaction
    built_soon(pulled, "a git pull")
    merged = other.commit("more upstream work", {"more.txt": "x\n"})
    git("fetch", "-q", str(upstream), "main")                          # FETCH_HEAD only: no branch moved
    git("merge", "-q", "--ff-only", "FETCH_HEAD")
    built_soon(merged, "a git merge")
    other.git("reset", "-q", "--hard", "HEAD~1")
    reset_to = other.commit("a different line of work", {"other.txt": "y\n"})
    git("fetch", "-q", str(upstream), "main")
    git("reset", "-q", "--hard", "FETCH_HEAD")                         # only reference-transaction sees this
    built_soon(reset_to, "a git reset")
