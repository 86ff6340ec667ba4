"""settings.resolve: the configuration resolved once at start-up (secrets read,
limits, TLS contexts, build defaults checked against the wire table), and
every failure naming the key and the file."""

from __future__ import annotations

import ssl
from dataclasses import fields
from pathlib import Path

import pytest
import trustme

from ci import protocol
from ci.config import AuthConfig, ConfigError, load
from ci.limits import Limits
from ci.settings import resolve


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tinyci.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, str]:
    where = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {"ca": where / "ca.pem", "cert": where / "cert.pem", "key": where / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    return {name: str(path) for name, path in files.items()}


# ---------------------------------------------------------------- what it resolves

def test_defaults_resolve_to_no_secrets_the_default_limits_and_no_tls():
    settings = resolve(load(None, env={}))
    assert settings.secrets == dict.fromkeys(protocol.ROLES, "")
    assert settings.limits == Limits()
    assert settings.server_tls is None and settings.client_tls is None


def test_every_role_has_its_own_secret_keys_in_the_auth_section():
    roles = {f.name[:-len("_secret")] for f in fields(AuthConfig)
             if f.name.endswith("_secret") and f.name != "secret"}
    assert roles == set(protocol.ROLES)
    assert {f.name for f in fields(AuthConfig)} == {
        "secret", "secret_file", *(f"{role}_secret" for role in roles), *(f"{role}_secret_file" for role in roles)}


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
