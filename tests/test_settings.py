"""settings.resolve: the configuration resolved once at start-up (secrets read,
limits, TLS contexts, build defaults checked against the wire table), and
every failure naming the key and the file."""

from __future__ import annotations

import ssl
from dataclasses import fields
from pathlib import Path

import pytest

from ci import protocol
from ci.config import AuthConfig, ConfigError, load
from ci.limits import Limits
from ci.settings import resolve


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tinyci.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- what it resolves

def test_defaults_resolve_to_no_secrets_the_default_limits_and_no_tls():
    settings = resolve(load(None, env={}))
    # the dispatcher has no secret of its own: it proves itself with each runner's
    assert settings.secrets == dict.fromkeys(["runner", "observer", "operator", "reader"], "")
    assert not settings.secured and settings.key("reader") == "" and settings.runner_key("any") == ""
    assert settings.limits == Limits()
    assert settings.server_tls is None and settings.client_tls is None


def test_every_role_but_the_dispatcher_has_its_own_secret_keys_in_the_auth_section():
    roles = {f.name[:-len("_secret")] for f in fields(AuthConfig)
             if f.name.endswith("_secret") and f.name != "secret"}
    assert roles == set(protocol.ROLES) - {protocol.DISPATCHER}
    assert {f.name for f in fields(AuthConfig)} == {
        "secret", "secret_file", "runners", "runners_file",
        *(f"{role}_secret" for role in roles), *(f"{role}_secret_file" for role in roles)}


def test_secret_from_env_and_from_file(tmp_path):
    assert resolve(load(None, env={"TINYCI_AUTH_SECRET": "s3"})).secret("reader") == "s3"
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    settings = resolve(load(None, env={"TINYCI_AUTH_SECRET_FILE": str(secret), "TINYCI_AUTH_SECRET": "not me"}))
    assert settings.secret("observer") == "from-file"


def test_limits_come_from_the_net_section(tmp_path):
    settings = resolve(load(write(tmp_path, "net:\n  read_timeout: 2.5\n"), env={}))
    assert settings.limits == Limits(read_timeout=2.5)


def test_tls_contexts_are_made_once_for_listening_and_connecting(pem):
    config = load(None, env={"TINYCI_TLS_CERT": pem["cert"], "TINYCI_TLS_KEY": pem["key"],
                             "TINYCI_TLS_CA": pem["ca"]})
    settings = resolve(config)
    assert isinstance(settings.server_tls, ssl.SSLContext) and isinstance(settings.client_tls, ssl.SSLContext)
    assert settings.server_tls.verify_mode == ssl.CERT_REQUIRED       # with a CA: mutual TLS


def test_a_tool_reads_only_its_own_secrets_and_makes_no_server_context(tmp_path, pem):
    # the runner's secret file and the server key live on another machine
    config = load(None, env={"TINYCI_AUTH_RUNNER_SECRET_FILE": str(tmp_path / "elsewhere"),
                             "TINYCI_AUTH_READER_SECRET": "r", "TINYCI_TLS_CA": pem["ca"],
                             "TINYCI_TLS_KEY": str(tmp_path / "server.key")})
    settings = resolve(config, roles=[protocol.READER], listens=False)
    assert settings.secrets == {"reader": "r"}
    assert settings.server_tls is None and isinstance(settings.client_tls, ssl.SSLContext)
    with pytest.raises(ConfigError):
        resolve(config)                 # a daemon needs them all


# ---------------------------------------------------------------- errors name the key and the file

def test_a_secret_file_that_cannot_be_read_names_the_key_and_the_file(tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(ConfigError) as err:
        resolve(load(None, env={"TINYCI_AUTH_OPERATOR_SECRET_FILE": str(absent)}))
    assert str(err.value) == f"auth.operator_secret_file: cannot read {absent}: No such file or directory"
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as err:
        resolve(load(None, env={"TINYCI_AUTH_SECRET_FILE": str(binary)}))
    assert str(err.value) == f"auth.secret_file: cannot read {binary}: not a text file"


@pytest.mark.parametrize("tls, key", [
    ({"cert": "{tmp}/absent.pem"}, "tls.cert: "),
    ({"cert": "{pem[cert]}", "key": "{tmp}/absent.key"}, "tls.key: "),
    ({"cert": "{tmp}/junk.pem"}, "tls.cert/tls.key: cannot load"),
    ({"key": "{pem[key]}"}, "tls.key is set but tls.cert is not"),
    ({"ca": "{tmp}/junk.pem"}, "tls.ca: cannot load"),
])
def test_tls_files_that_do_not_load_name_the_key(tmp_path, pem, tls, key):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    env = {f"TINYCI_TLS_{name.upper()}": value.format(tmp=tmp_path, pem=pem) for name, value in tls.items()}
    with pytest.raises(ConfigError) as err:
        resolve(load(None, env=env))
    assert str(err.value).startswith(key), err.value


def test_build_settings_the_runner_would_refuse_fail_at_start_up(tmp_path):
    # each would otherwise be accepted and then refused in every `run` message
    for body, key in (("build:\n  env: {MY-VAR: '1'}\n", "build.env"),
                      ("build:\n  steps: [" + ", ".join(["'true'"] * 201) + "]\n", "build.steps")):
        path = write(tmp_path, body)
        config = load(path, env={})
        with pytest.raises(ConfigError) as err:
            resolve(config)
        assert str(err.value).startswith(f"{path}: {key} must be a "), err.value
    with pytest.raises(ConfigError, match="^environment: build.env must be"):
        resolve(load(None, env={"TINYCI_BUILD_ENV": '{"A B": "1"}'}))


# ---------------------------------------------------------------- runners' own credentials

def test_each_runner_has_its_own_key_and_the_shared_runner_secret_covers_the_others(tmp_path):
    runners = tmp_path / "runners.yaml"
    runners.write_text("r2: from-file\n")
    path = write(tmp_path, f"auth:\n  secret: shared\n  runners: {{r1: one}}\n  runners_file: {runners}\n")
    settings = resolve(load(path, env={}))
    assert settings.runners == {"r1": "one", "r2": "from-file"}
    assert [settings.runner_key(name) for name in ("r1", "r2", "r3")] == ["one", "from-file", "shared"]
    assert settings.key("runner", "r1") == "one" and settings.key("reader") == "shared"
    # without a shared runner secret, a runner that is not listed has no key: it is refused, never let in
    only_listed = resolve(load(None, env={"TINYCI_AUTH_RUNNERS": '{"r1": "one"}', "TINYCI_AUTH_OBSERVER_SECRET": "o",
                                          "TINYCI_AUTH_OPERATOR_SECRET": "p", "TINYCI_AUTH_READER_SECRET": "q"}))
    assert only_listed.runner_key("r1") == "one" and only_listed.runner_key("r3") is None
    assert only_listed.key("runner", "r3") is None


def test_a_runner_needs_only_its_own_secret(tmp_path):
    # a runner machine's whole configuration: its own credential, nothing of the other roles
    settings = resolve(load(None, env={"TINYCI_AUTH_RUNNER_SECRET": "mine"}), roles=[protocol.RUNNER])
    assert settings.secrets == {"runner": "mine"} and settings.runner_key("r7") == "mine"


@pytest.mark.parametrize("text, words", [
    ("r1: [a, b]\n", "entry 'r1': the secret must be a non-empty string"),
    ("r1: ''\n", "entry 'r1': the secret must be a non-empty string"),
    ("'bad name': s3cret-value\n", "entry 'bad name' is not a runner name of"),
    ("- r1\n", "expected a mapping of runner names to secrets"),
    ("r1: [unclosed\n", "is not valid YAML"),
])
def test_a_runners_file_that_is_not_a_mapping_of_names_to_secrets_names_the_file_and_entry(tmp_path, text, words):
    runners = tmp_path / "runners.yaml"
    runners.write_text(text)
    with pytest.raises(ConfigError) as err:
        resolve(load(None, env={"TINYCI_AUTH_SECRET": "s", "TINYCI_AUTH_RUNNERS_FILE": str(runners)}))
    message = str(err.value)
    assert message.startswith("auth.runners_file") and str(runners) in message and words in message, message
    assert "s3cret-value" not in message and len(message.splitlines()) == 1


def test_a_runner_in_both_the_map_and_the_file_is_refused_and_an_unreadable_file_named(tmp_path):
    runners = tmp_path / "runners.yaml"
    runners.write_text("r1: two\n")
    env = {"TINYCI_AUTH_SECRET": "s", "TINYCI_AUTH_RUNNERS": '{"r1": "one"}', "TINYCI_AUTH_RUNNERS_FILE": str(runners)}
    with pytest.raises(ConfigError, match="runner 'r1' is also in auth.runners"):
        resolve(load(None, env=env))
    absent = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as err:
        resolve(load(None, env={"TINYCI_AUTH_SECRET": "s", "TINYCI_AUTH_RUNNERS_FILE": str(absent)}))
    assert str(err.value) == f"auth.runners_file: cannot read {absent}: No such file or directory"
    # a tool never reads it: it is the dispatcher's
    assert resolve(load(None, env={"TINYCI_AUTH_SECRET": "s", "TINYCI_AUTH_RUNNERS_FILE": str(absent)}),
                   roles=[protocol.READER], listens=False).secret("reader") == "s"


# ---------------------------------------------------------------- once one secret is set, all are

def test_one_role_with_a_secret_leaves_no_other_open(tmp_path):
    path = write(tmp_path, "auth:\n  reader_secret: r\n")
    with pytest.raises(ConfigError) as err:
        resolve(load(path, env={}))
    assert str(err.value) == (
        f"{path}: auth.reader_secret is set, but role(s) observer, operator, runner have no secret: once any "
        f"secret is set, every role must have one (auth.secret for all, or auth.<role>_secret for each)")
    # only the roles a program accepts or uses count
    assert resolve(load(path, env={}), roles=[protocol.READER], listens=False).secured
    with pytest.raises(ConfigError, match="role.s. operator have no secret"):
        resolve(load(path, env={}), roles=[protocol.OPERATOR], listens=False)
    with pytest.raises(ConfigError, match="role.s. runner have no secret"):
        resolve(load(path, env={}), roles=[protocol.RUNNER])
    # a runners map is the runner role's secret on the dispatcher; the shared secret covers the rest
    env = {"TINYCI_AUTH_RUNNERS": '{"r1": "one"}', "TINYCI_AUTH_SECRET": "shared"}
    assert resolve(load(path, env=env)).secrets == {"runner": "shared", "observer": "shared",
                                                    "operator": "shared", "reader": "r"}


# ---------------------------------------------------------------- pipelines and build secrets

DISPATCHER_ROLES = [protocol.RUNNER, protocol.OBSERVER, protocol.OPERATOR, protocol.READER]


def test_pipelines_are_checked_as_ci_yaml_and_secrets_read_once(tmp_path):
    token = tmp_path / "token"
    token.write_text("  a-token-read-from-a-file\n")
    kept = tmp_path / "kept.yaml"
    kept.write_text("jobs:\n  build: {steps: [make], secrets: [DEPLOY]}\n")
    path = write(tmp_path, f"""
pipelines:
  /srv/a.git: {{override: true, jobs: {{test: {{steps: [pytest], labels: [py]}}}}}}
  /srv/b.git: {{file: {kept}}}
secrets:
  DEPLOY: {{file: {token}, branches: [main, "release/*"]}}
  OTHER: another-long-value
""")
    settings = resolve(load(path, env={}), roles=DISPATCHER_ROLES)
    a, b = settings.pipeline("/srv/a.git"), settings.pipeline("/srv/b.git")
    assert a.override and a.jobs == [{"name": "test", "labels": ["py"]}]
    assert not b.override and b.jobs == [{"name": "build", "labels": [], "secrets": ["DEPLOY"]}]
    assert settings.pipeline("/srv/c.git") is None
    assert "pytest" in a.text and b.text == kept.read_text()
    assert settings.secrets_for(["DEPLOY", "OTHER"], "release/1.0") == {
        "DEPLOY": "a-token-read-from-a-file", "OTHER": "another-long-value"}
    assert settings.secrets_for(["DEPLOY"], "feature") == {}
    assert settings.secret_problem("DEPLOY", "feature") == (
        "secret DEPLOY is not allowed on branch feature (secrets.DEPLOY.branches: main, release/*)")
    assert settings.secret_problem("NOPE", "main") == "secret NOPE is not defined on the dispatcher (secrets.NOPE)"
    assert settings.secret_problem("OTHER", "anything") == ""
    assert "a-token-read-from-a-file" not in repr(settings)
    # a runner, an observer and the tools read neither
    token.unlink()
    for roles, listens in (([protocol.RUNNER], True), ([protocol.OBSERVER, protocol.OPERATOR], True),
                           ([protocol.READER], False)):
        other = resolve(load(path, env={}), roles=roles, listens=listens)
        assert other.pipelines == {} and other.build_secrets == {}


@pytest.mark.parametrize("entry, expected", [
    ("{steps: [{run: [not, a, string]}]}", "pipelines./r: steps[1].run must be a non-empty string"),
    ("{jobs: {a: {steps: [make], secrets: [bad-name]}}}", "pipelines./r: jobs.a.secrets: 'bad-name' is not a valid"),
    ("{jobs: {a: {stepz: [make]}}}", "pipelines./r: jobs.a: unknown key 'stepz'"),
    ("{file: /nonexistent/ci.yaml}", "pipelines./r.file: cannot read /nonexistent/ci.yaml"),
])
def test_a_bad_pipeline_names_the_file_and_key(tmp_path, entry, expected):
    path = write(tmp_path, f"pipelines:\n  /r: {entry}\n")
    with pytest.raises(ConfigError) as err:
        resolve(load(path, env={}), roles=DISPATCHER_ROLES)
    assert str(err.value).startswith(str(path)) and expected in str(err.value), str(err.value)


def test_a_secret_file_too_short_or_unreadable_names_the_key_not_the_value(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    path = write(tmp_path, f"secrets:\n  TOKEN: {{file: {short}}}\n")
    with pytest.raises(ConfigError) as err:
        resolve(load(path, env={}), roles=DISPATCHER_ROLES)
    assert "secrets.TOKEN.file" in str(err.value) and "fewer than 8 characters" in str(err.value)
    assert "abc" not in str(err.value)
    short.unlink()
    with pytest.raises(ConfigError) as err:
        resolve(load(path, env={}), roles=DISPATCHER_ROLES)
    assert "secrets.TOKEN.file: cannot read" in str(err.value)
