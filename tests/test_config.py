"""Configuration: the documented config.yaml, precedence, and errors that name the key and the file."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from ci import config as cfg
from ci.config import Config, ConfigError, load

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "config.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tinyci.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the documented file

def test_config_yaml_is_exactly_the_built_in_defaults():
    loaded = load(DOC, env={})
    defaults = Config()
    for section in cfg.SECTIONS:
        assert getattr(loaded, section) == getattr(defaults, section), f"config.yaml section {section} drifted"


def test_config_yaml_lists_every_section_and_key_with_a_comment():
    data = yaml.safe_load(DOC.read_text())
    assert set(data) == {*cfg.SECTIONS, *cfg.FREE}
    assert all(data[section] == {} for section in cfg.FREE)     # examples only, in comments
    for section, factory in cfg.SECTIONS.items():
        assert set(data[section]) == {f.name for f in fields(factory())}, f"keys of {section}"
    # every key is preceded (directly or within its group) by a comment line
    lines = DOC.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("  ") and not line.lstrip().startswith("#") and ":" in line:
            above = [l for l in lines[max(0, number - 4):number] if l.strip()]
            assert any(l.lstrip().startswith("#") for l in above), f"config.yaml line {number + 1} has no comment"


def test_no_file_and_no_env_gives_defaults():
    assert load(None, env={}) == Config()


def test_empty_file_gives_defaults(tmp_path):
    loaded = load(write(tmp_path, "# nothing\n"), env={})
    assert loaded.dispatcher == Config().dispatcher and loaded.source.endswith("tinyci.yaml")


# ---------------------------------------------------------------- precedence

def test_file_beats_default(tmp_path):
    path = write(tmp_path, "dispatcher:\n  port: 9001\nrunner:\n  labels: [linux, gpu]\n")
    loaded = load(path, env={})
    assert loaded.dispatcher.port == 9001
    assert loaded.runner.labels == ["linux", "gpu"]
    assert loaded.dispatcher.host == "127.0.0.1"


def test_env_beats_file(tmp_path):
    path = write(tmp_path, "dispatcher:\n  port: 9001\n")
    loaded = load(path, env={"TINYCI_DISPATCHER_PORT": "9002", "TINYCI_RUNNER_LABELS": "a, b",
                             "TINYCI_OBSERVER_FETCH": "yes", "TINYCI_BUILD_ENV": '{"X": "1"}',
                             "TINYCI_NET_READ_TIMEOUT": "2.5"})
    assert loaded.dispatcher.port == 9002
    assert loaded.runner.labels == ["a", "b"]
    assert loaded.observer.fetch is True
    assert loaded.build.env == {"X": "1"}
    assert loaded.net.read_timeout == 2.5


def test_flag_beats_env_and_file(tmp_path):
    path = write(tmp_path, "dispatcher:\n  port: 9001\n")
    loaded = load(path, env={"TINYCI_DISPATCHER_PORT": "9002"},
                  overrides={"dispatcher": {"port": 9003, "host": None}})
    assert loaded.dispatcher.port == 9003
    assert loaded.dispatcher.host == "127.0.0.1"     # a flag left out (None) changes nothing


def test_tinyci_config_variable_names_the_file(tmp_path):
    path = write(tmp_path, "observer:\n  poll_interval: 7\n")
    loaded = load(None, env={"TINYCI_CONFIG": str(path)})
    assert loaded.observer.poll_interval == 7.0
    assert loaded.source == str(path)


def test_ci_variables_are_left_to_builds(tmp_path):
    # builds see CI_*; the configuration must not read them
    assert load(None, env={"CI": "true", "CI_BUILD": "3", "CI_DISPATCHER_PORT": "1"}) == Config()


def test_where_each_key_came_from_is_kept_for_later_errors(tmp_path):
    path = write(tmp_path, "dispatcher:\n  port: 9001\n")
    loaded = load(path, env={"TINYCI_RUNNER_SLOTS": "2"}, overrides={"observer": {"repo": "/r"}})
    assert loaded.origin("dispatcher", "port") == str(path)
    assert loaded.origin("runner", "slots") == "environment"
    assert loaded.origin("observer", "repo") == "command line"
    assert loaded.origin("build", "steps") == "built-in defaults"


def test_the_net_section_is_the_transports_limits():
    from ci import net
    assert load(None, env={"TINYCI_NET_MAX_FRAME": "4096"}).net == net.Limits(max_frame=4096)


# ---------------------------------------------------------------- errors

def test_unknown_section_names_file_and_section(tmp_path):
    path = write(tmp_path, "dispatchr:\n  port: 1\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert str(path) in str(err.value) and "dispatchr" in str(err.value)


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "runner:\n  slot: 2\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert str(path) in str(err.value) and "runner.slot" in str(err.value)
    assert "slots" in str(err.value)          # the message lists what would have been right


@pytest.mark.parametrize("text, key", [
    ("dispatcher:\n  port: eighty\n", "dispatcher.port"),
    ("runner:\n  labels: linux\n", "runner.labels"),
    ("observer:\n  fetch: 3\n", "observer.fetch"),
    ("build:\n  env: [a]\n", "build.env"),
    ("runner:\n  slots: true\n", "runner.slots"),
    ("runner:\n  slots: 0\n", "runner.slots"),
])
def test_wrong_type_or_range_names_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert key in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("name, value", [
    ("TINYCI_DISPATCHER_PORT", "eighty"),
    ("TINYCI_OBSERVER_FETCH", "maybe"),
    ("TINYCI_DISPATCHER_NOPE", "1"),
])
def test_bad_environment_variable_is_named(name, value):
    with pytest.raises(ConfigError) as err:
        load(None, env={name: value})
    assert name in str(err.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "dispatcher:\n  port: 8888\n  host: a: b\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "absent.yaml", env={})
    assert "absent.yaml" in str(err.value) and "not found" in str(err.value)


def test_file_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, "- just\n- a list\n"), env={})
    assert "tinyci.yaml" in str(err.value)


def test_build_timeout_out_of_range_names_the_key(tmp_path):
    path = write(tmp_path, "build:\n  timeout: 1.0e16\n")
    with pytest.raises(ConfigError, match="build.timeout"):
        load(path, env={})
    # build.steps and build.env are checked against the wire table by settings.resolve
    # (tests/test_settings.py); loading alone accepts them


# ---------------------------------------------------------------- auth

def test_the_dispatcher_secret_is_gone_and_a_config_that_sets_it_is_told_why(tmp_path):
    for key in ("dispatcher_secret", "dispatcher_secret_file"):
        path = write(tmp_path, f"auth:\n  {key}: x\n")
        with pytest.raises(ConfigError) as err:
            load(path, env={})
        assert str(err.value).startswith(f"{path}: auth.{key} is no longer used: the dispatcher now proves "
                                         f"itself to each runner with that runner's own secret (auth.runners "
                                         f"on the dispatcher, auth.runner_secret on the runner)")
    with pytest.raises(ConfigError, match="^environment variable TINYCI_AUTH_DISPATCHER_SECRET: auth.dispatcher_secret "
                                          "is no longer used"):
        load(None, env={"TINYCI_AUTH_DISPATCHER_SECRET": "x"})


def test_runners_credentials_from_file_and_environment_never_shown_in_errors(tmp_path):
    path = write(tmp_path, "auth:\n  runners:\n    r1: one\n    r2: 12345\n")
    assert load(path, env={}).auth.runners == {"r1": "one", "r2": "12345"}
    assert load(None, env={"TINYCI_AUTH_RUNNERS": '{"r1": "one"}'}).auth.runners == {"r1": "one"}
    for env in ({"TINYCI_AUTH_RUNNERS": '{"r1": "s3cret-value"'}, {"TINYCI_AUTH_RUNNERS": '["s3cret-value"]'}):
        with pytest.raises(ConfigError) as err:
            load(None, env=env)
        assert "auth" in str(err.value).lower() and "s3cret-value" not in str(err.value), err.value


# ---------------------------------------------------------------- pipelines and build secrets

def test_pipelines_and_secrets_are_sections_named_by_the_operator(tmp_path):
    path = write(tmp_path, """
pipelines:
  /srv/git/a.git: {override: true, steps: [make]}
  /srv/git/b.git: {file: /etc/tinyci/b.yaml}
secrets:
  PYPI_TOKEN: pypi-long-enough-value
  DEPLOY: {file: /etc/deploy, branches: [main, "release/*"]}
  SSH_KEY_file: /etc/ssh-key
""")
    loaded = load(path, env={"TINYCI_SECRETS_FROM_ENV": "an-env-secret-value"})
    assert loaded.pipelines["/srv/git/a.git"] == {"override": True, "steps": ["make"]}
    assert loaded.pipelines["/srv/git/b.git"] == {"file": "/etc/tinyci/b.yaml"}
    assert loaded.secrets == {
        "PYPI_TOKEN": {"value": "pypi-long-enough-value", "branches": ["*"]},
        "DEPLOY": {"file": "/etc/deploy", "branches": ["main", "release/*"]},
        "SSH_KEY": {"file": "/etc/ssh-key", "branches": ["*"]},
        "FROM_ENV": {"value": "an-env-secret-value", "branches": ["*"]}}
    assert loaded.origin("secrets", "FROM_ENV") == "environment"
    assert "pypi-long-enough-value" not in repr(loaded)        # never printed with the configuration


@pytest.mark.parametrize("text, expected", [
    ("secrets: {TOKEN: short}", "secrets.TOKEN is shorter than 8 characters"),
    ("secrets: {TOKEN: {value: a-long-value, file: /x}}", "secrets.TOKEN needs one of 'value' or 'file'"),
    ("secrets: {TOKEN: {valu: a-long-value}}", "secrets.TOKEN: unknown key 'valu'"),
    ("secrets: {TOKEN: {value: a-long-value, branches: main}}", "secrets.TOKEN.branches must be a non-empty list"),
    ("secrets: {'BAD-NAME': a-long-value}", "secrets.BAD-NAME: 'BAD-NAME' must be an environment variable name"),
    ("secrets: {CI_TOKEN: a-long-value}", "not CI or CI_*/TINYCI_*"),
    ("secrets: {TOKEN: a-long-value, TOKEN_file: /x}", "secret 'TOKEN' is also set"),
    ("secrets: [TOKEN]", "section 'secrets' must be a mapping of secret names"),
    ("pipelines: {/r: [make]}", "pipelines./r must be a build definition"),
    ("pipelines: {/r: {override: yes please, steps: [make]}}", "pipelines./r.override must be true or false"),
    ("pipelines: {/r: {override: true}}", "pipelines./r has no definition"),
    ("pipelines: {/r: {file: /x, steps: [make]}}", "pipelines./r: 'steps' next to 'file'"),
])
def test_a_bad_pipeline_or_secret_is_one_line_naming_the_key_never_the_value(tmp_path, text, expected):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message, message
    assert "a-long-value" not in message and "short" not in message.replace("shorter", "")


def test_each_keys_kind_is_the_one_its_annotation_names():
    # config reads the kinds from the annotations' names, so a tool need not import typing
    import typing
    for factory in cfg.SECTIONS.values():
        assert cfg._kinds(factory) == typing.get_type_hints(factory), factory.__name__
