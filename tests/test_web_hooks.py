"""A forge's push webhooks (ci/web/hooks.py): the proofs each forge sends,
the secrets read from the configuration, and end to end: a real "forge"
(a bare repository), a real observer fetching from it only when poked, a
real dispatcher and a real `tinyci web`. A signed push makes the observer
fetch and the build is queued; a bad or missing proof is refused with the
reason and nothing is poked."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from ci.config import ConfigError, load
from ci.web import hooks

from conftest import GIT_ENV, Repo, tinyci
from web_site import start_web

GITHUB_SECRET = "gh-hook-secret"
GITEA_SECRET = "gitea-hook-secret"
GITLAB_TOKEN = "gitlab-hook-token"


# ---------------------------------------------------------------- the forges' own payloads and headers

def _commit(sha: str, message: str) -> dict:
    return {"id": sha, "message": message, "timestamp": "2026-11-30T12:00:00+00:00",
            "url": f"https://forge.example/ada/app/commit/{sha}",
            "author": {"name": "Ada Lovelace", "email": "ada@example.com", "username": "ada"},
            "committer": {"name": "Ada Lovelace", "email": "ada@example.com", "username": "ada"},
            "added": [], "removed": [], "modified": ["file.txt"]}


def github_push(ref: str, before: str, after: str) -> dict:
    """The fields of GitHub's `push` event (docs.github.com, webhook events and payloads)."""
    return {"ref": ref, "before": before, "after": after, "created": False, "deleted": False, "forced": False,
            "base_ref": None, "compare": f"https://github.com/ada/app/compare/{before[:12]}...{after[:12]}",
            "commits": [_commit(after, "change")], "head_commit": _commit(after, "change"),
            "repository": {"id": 1, "name": "app", "full_name": "ada/app", "private": False,
                           "clone_url": "https://github.com/ada/app.git", "default_branch": "main"},
            "pusher": {"name": "ada", "email": "ada@example.com"}, "sender": {"login": "ada", "id": 1}}


def gitea_push(ref: str, before: str, after: str) -> dict:
    """The fields of Gitea's push payload (docs.gitea.com, webhooks)."""
    return {"ref": ref, "before": before, "after": after,
            "compare_url": f"http://localhost:3000/ada/app/compare/{before}...{after}",
            "commits": [_commit(after, "change")], "head_commit": _commit(after, "change"),
            "repository": {"id": 140, "owner": {"id": 1, "login": "ada", "full_name": "Ada Lovelace"},
                           "name": "app", "full_name": "ada/app", "private": False,
                           "html_url": "http://localhost:3000/ada/app",
                           "clone_url": "http://localhost:3000/ada/app.git", "default_branch": "main"},
            "pusher": {"id": 1, "login": "ada"}, "sender": {"id": 1, "login": "ada"}}


def gitlab_push(ref: str, before: str, after: str) -> dict:
    """The fields of GitLab's Push Hook (docs.gitlab.com, webhook events)."""
    return {"object_kind": "push", "event_name": "push", "before": before, "after": after, "ref": ref,
            "checkout_sha": after, "message": None, "user_id": 4, "user_name": "Ada Lovelace",
            "user_username": "ada", "user_email": "", "project_id": 15,
            "project": {"id": 15, "name": "app", "web_url": "http://gitlab.example/ada/app",
                        "git_ssh_url": "git@gitlab.example:ada/app.git",
                        "git_http_url": "http://gitlab.example/ada/app.git",
                        "path_with_namespace": "ada/app", "default_branch": "main"},
            "commits": [_commit(after, "change")], "total_commits_count": 1,
            "repository": {"name": "app", "url": "git@gitlab.example:ada/app.git",
                           "homepage": "http://gitlab.example/ada/app"}}


def signed(forge: str, body: bytes, secret: str | None = None, event: str = "push") -> dict:
    """The headers ``forge`` sends with ``body``; ``secret`` overrides the right one."""
    if forge == "github":
        key = (secret or GITHUB_SECRET).encode()
        return {"X-GitHub-Event": event, "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
                "X-Hub-Signature-256": "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()}
    if forge == "gitea":
        key = (secret or GITEA_SECRET).encode()
        return {"X-Gitea-Event": event, "X-GitHub-Event": event, "X-Gogs-Event": event,
                "X-Gitea-Delivery": "f6266f16-1bf3-46a5-9ea4-602e06ead473",
                "X-Gitea-Signature": hmac.new(key, body, hashlib.sha256).hexdigest()}
    return {"X-Gitlab-Event": "Push Hook" if event == "push" else event,
            "X-Gitlab-Token": secret or GITLAB_TOKEN}


PAYLOADS = {"github": github_push, "gitea": gitea_push, "gitlab": gitlab_push}


# ---------------------------------------------------------------- the proofs and the configuration

def test_each_forge_proof_is_checked_on_the_raw_body():
    body = json.dumps(github_push("refs/heads/main", "0" * 40, "1" * 40)).encode()
    for name, forge in hooks.FORGES.items():
        secret = {"github": GITHUB_SECRET, "gitea": GITEA_SECRET, "gitlab": GITLAB_TOKEN}[name].encode()
        proof = signed(name, body)[forge.proof]
        assert forge.check(secret, body, proof), name
        assert not forge.check(b"another secret", body, proof), name
        if name != "gitlab":        # a token proves nothing about the body; a signature does
            assert not forge.check(secret, body + b" ", proof), name
    assert not hooks.FORGES["github"].check(b"s", b"{}", hmac.new(b"s", b"{}", hashlib.sha256).hexdigest())
    # a header of stray bytes (as aiohttp decodes them) is a wrong proof, not a crash
    for name, forge in hooks.FORGES.items():
        assert not forge.check(b"secret", body, "\udcff\udcfe"), name


def test_branch_of_a_push_and_nothing_else():
    assert hooks.branch_of({"ref": "refs/heads/release/1.x"}) == "release/1.x"
    assert hooks.branch_of({"ref": "refs/tags/v1"}) is None
    assert hooks.branch_of({"ref": 7}) is None
    assert hooks.branch_of(["refs/heads/main"]) is None


def test_secrets_come_from_the_config_or_their_files(tmp_path):
    (tmp_path / "gitea").write_text(GITEA_SECRET + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"web:\n  github_secret: {GITHUB_SECRET}\n  gitea_secret: ignored\n"
                      f"  gitea_secret_file: {tmp_path / 'gitea'}\n")
    assert hooks.secrets(load(config)) == {"github": GITHUB_SECRET.encode(), "gitea": GITEA_SECRET.encode()}
    config.write_text(f"web:\n  gitlab_token_file: {tmp_path / 'missing'}\n")
    with pytest.raises(ConfigError, match=r"web.gitlab_token_file: cannot read .*missing"):
        hooks.secrets(load(config))
    with pytest.raises(ConfigError) as refused:
        load(None, env={"TINYCI_WEB_GITHUB_SECRET": "x", "TINYCI_WEB_GITEA_SECRET": "y",
                        "TINYCI_WEB_OBSERVER": "z", "TINYCI_WEB_GITLAB_TOKEN": "t", "TINYCI_WEB_NOPE": "1"})
    assert "TINYCI_WEB_NOPE" in str(refused.value)


def test_a_wrongly_typed_hook_secret_is_not_shown(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("web:\n  github_secret: [s3cr3t-value]\n")
    with pytest.raises(ConfigError) as refused:
        load(config)
    assert "web.github_secret must be a string" in str(refused.value) and "s3cr3t" not in str(refused.value)


# ---------------------------------------------------------------- end to end

def _post(base: str, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), **GIT_ENV}).stdout.strip()


@pytest.fixture
def forge(tmp_path, cluster):
    """A bare "forge" repository, a developer's clone pushing to it, the watched clone of it,
    and a cluster: dispatcher, observer (fetching only when poked) and web with all three hooks."""
    bare = tmp_path / "forge.git"
    bare.mkdir()
    _git(bare, "init", "-q", "--bare", "-b", "main")
    dev = Repo(tmp_path / "dev")
    dev.commit("initial", {"build.sh": "exit 0\n"})
    dev.git("push", "-q", str(bare), "main")
    _git(tmp_path, "clone", "-q", str(bare), str(tmp_path / "watched"))
    (tmp_path / "gitea-secret").write_text(GITEA_SECRET + "\n")
    c = cluster(extra={"auth": {"secret": "cluster-secret"},
                       "observer": {"fetch": True, "fetch_interval": 3600.0},
                       # a login is required for everything else: the hooks' login is the forge's proof
                       "web": {"token": "api-token", "github_secret": GITHUB_SECRET,
                               "gitea_secret_file": str(tmp_path / "gitea-secret"), "gitlab_token": GITLAB_TOKEN}})
    c.dispatcher()
    observer = c.observer(SimpleNamespace(path=tmp_path / "watched"), "-v", interval=0.2)
    c.env["TINYCI_WEB_OBSERVER"] = observer.addr
    web, site = start_web(c)
    first = dev.head()
    c.wait_builds(lambda builds: any(b["sha"] == first for b in builds), "the build of the first head")
    return SimpleNamespace(cluster=c, dev=dev, bare=bare, watched=tmp_path / "watched", observer=observer,
                           web=web, base=site.base)


def _pokes(observer) -> int:
    return observer.log(tail=10**7).count("poked by")


@pytest.mark.parametrize("name", sorted(hooks.FORGES))
def test_a_signed_push_is_fetched_and_built_and_a_bad_one_is_refused(forge, name):
    c, dev = forge.cluster, forge.dev
    before = dev.head()
    after = dev.commit(f"pushed to {name}")
    dev.git("push", "-q", str(forge.bare), "main")
    body = json.dumps(PAYLOADS[name]("refs/heads/main", before, after)).encode()
    fetched = lambda: _git(forge.watched, "rev-parse", "refs/remotes/origin/main")

    status, reply = _post(forge.base, f"/hooks/{name}", body, signed(name, body, secret="not the secret"))
    proof = hooks.FORGES[name].proof
    assert status == 403 and f"{proof} does not match" in reply["error"], reply
    headers = signed(name, body)
    del headers[proof]
    status, reply = _post(forge.base, f"/hooks/{name}", body, headers)
    assert status == 401 and f"no {proof} header" in reply["error"]
    # the web pokes before it answers, and the observer logs a poke before its reply: none came
    assert _pokes(forge.observer) == 0 and fetched() == before
    assert not any(b["sha"] == after for b in c.builds())

    status, reply = _post(forge.base, f"/hooks/{name}", body, signed(name, body))
    assert (status, reply.get("branch")) == (202, "main"), reply
    build = c.wait_builds(lambda builds: any(b["sha"] == after for b in builds), "the pushed commit's build")
    assert next(b for b in build if b["sha"] == after)["branch"] == "main"
    assert fetched() == after and _pokes(forge.observer) == 1
    assert f"{name} webhook: push to main; poked the observer" in forge.web.log()


def test_other_events_are_answered_and_ignored_and_unknown_forges_are_404(forge):
    ping = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    assert _post(forge.base, "/hooks/github", ping, signed("github", ping, event="ping")) == \
        (200, {"ok": True, "pong": True})
    tag = json.dumps(github_push("refs/tags/v1.0", "0" * 40, forge.dev.head())).encode()
    status, reply = _post(forge.base, "/hooks/github", tag, signed("github", tag))
    assert status == 202 and "not a push of a branch" in reply["ignored"]
    issue = b'{"action": "opened"}'
    status, reply = _post(forge.base, "/hooks/gitea", issue, signed("gitea", issue, event="issues"))
    assert status == 202 and "is not a push" in reply["ignored"]
    status, reply = _post(forge.base, "/hooks/bitbucket", issue, {})
    assert status == 404 and "/hooks/github" in reply["error"]
    with pytest.raises(urllib.error.HTTPError) as refused:     # everything else still needs the login
        urllib.request.urlopen(forge.base + "/api/builds", timeout=15)
    assert refused.value.code == 401
    garbage = b"not json"
    status, reply = _post(forge.base, "/hooks/gitlab", garbage, signed("gitlab", garbage))
    assert status == 400 and "not JSON" in reply["error"]
    assert _pokes(forge.observer) == 0


@pytest.mark.slow
def test_a_forge_without_a_secret_has_no_hook(tmp_path, cluster):
    c = cluster()
    c.dispatcher()
    web, site = start_web(c)
    body = json.dumps(github_push("refs/heads/main", "0" * 40, "1" * 40)).encode()
    status, reply = _post(site.base, "/hooks/github", body, signed("github", body))
    assert status == 404 and "web.github_secret" in reply["error"]


def test_a_hook_without_the_observer_secret_or_with_a_bad_file_stops_the_web(tmp_path):
    config = tmp_path / "web.yaml"
    config.write_text(f"auth: {{reader_secret: r}}\nweb: {{github_secret: {GITHUB_SECRET}}}\n")
    done = tinyci("web", "--port", "0", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "the webhooks poke the observer, with its secret:" in done.stderr and "observer" in done.stderr
    config.write_text(f"web: {{gitea_secret_file: {tmp_path / 'absent'}}}\n")
    done = tinyci("web", "--port", "0", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2 and "web.gitea_secret_file: cannot read" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
