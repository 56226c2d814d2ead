"""Config: defaults, environment overrides, interpolation, one-line errors with file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxcluster.config import MASK, Config, ConfigError, env_overrides, from_dict, load, to_dict
from mlxcluster.config_template import DEFAULT_CONFIG_TOML

REPO_ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    """The one-line message that loading ``text`` fails with."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, env=env or {})
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults ---------------------------------------------------------------------------------


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, ""), env={})
    assert config == Config()
    assert config.controller.bind == "127.0.0.1"
    assert config.nats.embedded.host == "127.0.0.1"
    assert config.cluster.mode == "dual"
    assert config.nats.mode == "embedded"
    assert config.workers.static == []


def test_no_file_is_all_defaults() -> None:
    assert load(None, env={}) == Config()


def test_template_equals_defaults(tmp_path: Path) -> None:
    assert load(write(tmp_path, DEFAULT_CONFIG_TOML), env={}) == Config()


def test_repo_cluster_toml_equals_defaults() -> None:
    assert load(REPO_ROOT / "cluster.toml", env={}) == Config()


def test_from_dict_nested_sections() -> None:
    config = from_dict({"nats": {"embedded": {"port": 4333}}, "workers": {"static": [{"name": "a"}]}})
    assert config.nats.embedded.port == 4333
    assert config.workers.static[0].name == "a"
    assert config.workers.static[0].host == "127.0.0.1"


# --- environment overrides --------------------------------------------------------------------


def test_env_override_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[controller]\nport = 9000\n")
    assert load(path, env={}).controller.port == 9000
    assert load(path, env={"MLXCLUSTER_CONTROLLER_PORT": "9100"}).controller.port == 9100


def test_env_override_nested_key() -> None:
    config = load(None, env={"MLXCLUSTER_NATS_EMBEDDED_PORT": "4333", "MLXCLUSTER_NATS_TLS_VERIFY": "false"})
    assert config.nats.embedded.port == 4333
    assert config.nats.tls.verify is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a,b", ["a", "b"]),
        (" a , b ,", ["a", "b"]),
        ('["a", "b,c"]', ["a", "b,c"]),
        ("", []),
        ("[]", []),
    ],
)
def test_env_override_list(text: str, expected: list[str]) -> None:
    assert load(None, env={"MLXCLUSTER_CONTROLLER_API_KEYS": text}).controller.api_keys == expected


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("1", True), ("false", False), ("0", False)])
def test_env_override_bool(text: str, expected: bool) -> None:
    assert load(None, env={"MLXCLUSTER_NATS_TLS_ENABLED": text}).nats.tls.enabled is expected


def test_env_override_float_str_and_optional() -> None:
    config = load(
        None,
        env={
            "MLXCLUSTER_CONTROLLER_REQUEST_TIMEOUT_S": "1.5",
            "MLXCLUSTER_WORKER_ID": "w1",
            "MLXCLUSTER_NATS_USER": "alice",
            "MLXCLUSTER_CLUSTER_MODE": "worker",
        },
    )
    assert config.controller.request_timeout_s == 1.5
    assert config.worker.id == "w1"
    assert config.nats.user == "alice"
    assert config.cluster.mode == "worker"


def test_env_overrides_cover_every_scalar_key() -> None:
    names = env_overrides()
    assert names["MLXCLUSTER_NATS_EMBEDDED_PORT"] == ("nats", "embedded", "port")
    assert names["MLXCLUSTER_CONTROLLER_API_KEYS"] == ("controller", "api_keys")
    assert names["MLXCLUSTER_LOAD_BALANCING_STRATEGY"] == ("load_balancing", "strategy")
    assert not any(name.startswith("MLXCLUSTER_WORKERS_STATIC") for name in names)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"MLXCLUSTER_NATS_EMBEDDED_PORT": "abc"},
            'env MLXCLUSTER_NATS_EMBEDDED_PORT: nats.embedded.port: expected int in 1..65535, got "abc"',
        ),
        (
            {"MLXCLUSTER_NATS_TLS_ENABLED": "maybe"},
            'env MLXCLUSTER_NATS_TLS_ENABLED: nats.tls.enabled: expected bool, got "maybe"',
        ),
        (
            {"MLXCLUSTER_CLUSTER_MODE": "triple"},
            'env MLXCLUSTER_CLUSTER_MODE: cluster.mode: expected one of "controller", "worker", "dual", got "triple"',
        ),
    ],
)
def test_env_override_invalid(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, env=env)
    assert str(info.value) == expected


def test_env_override_invalid_json_list() -> None:
    with pytest.raises(ConfigError, match=r"^env MLXCLUSTER_CONTROLLER_API_KEYS: controller.api_keys: invalid JSON"):
        load(None, env={"MLXCLUSTER_CONTROLLER_API_KEYS": "[1"})


def test_env_override_json_list_of_wrong_items() -> None:
    with pytest.raises(ConfigError, match=r"controller\.api_keys\[0\]: expected str, got 1"):
        load(None, env={"MLXCLUSTER_CONTROLLER_API_KEYS": "[1, 2]"})


def test_unrelated_env_is_ignored() -> None:
    assert load(None, env={"MLXCLUSTER_NOPE": "x", "MLXCLUSTER_CONFIG": "x.toml"}) == Config()


# --- interpolation ----------------------------------------------------------------------------


def test_interpolation(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[nats]\nurl = "nats://${NATS_HOST:-localhost}:${NATS_PORT}"\npassword = "${PW}"\n'
        '[controller]\napi_keys = ["${K1}", "x-${K2:-d}"]\n',
    )
    config = load(path, env={"NATS_PORT": "4333", "PW": "s3cret", "K1": "k"})
    assert config.nats.url == "nats://localhost:4333"
    assert config.nats.password == "s3cret"
    assert config.controller.api_keys == ["k", "x-d"]
    config = load(path, env={"NATS_HOST": "h", "NATS_PORT": "1", "PW": "", "K1": "k", "K2": "z"})
    assert config.nats.url == "nats://h:1"
    assert config.nats.password == ""
    assert config.controller.api_keys == ["k", "x-z"]


def test_interpolation_empty_default(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[worker]\nmodel = "${MODEL:-}"\n'), env={})
    assert config.worker.model == ""


def test_interpolation_unset_variable(tmp_path: Path) -> None:
    path = write(tmp_path, '[nats]\nurl = "nats://h:${NATS_PORT}"\n')
    message = load_error(tmp_path, path.read_text())
    assert message == f"{path}: nats.url: environment variable ${{NATS_PORT}} is not set"


def test_interpolation_unset_variable_in_list(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[controller]\napi_keys = ["ok", "${K1}"]\n')
    assert message.endswith("cluster.toml: controller.api_keys[1]: environment variable ${K1} is not set")


def test_interpolated_value_is_validated(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[cluster]\nmode = "${MODE}"\n', env={"MODE": "nope"})
    assert message.endswith('cluster.toml: cluster.mode: expected one of "controller", "worker", "dual", got "nope"')


# --- invalid files: one line, file + key path --------------------------------------------------


def test_port_not_an_int_exact_message(tmp_path: Path) -> None:
    path = write(tmp_path, '[nats.embedded]\nport = "abc"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(info.value) == f'{path}: nats.embedded.port: expected int in 1..65535, got "abc"'


def test_relative_path_message_is_exactly_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, '[nats.embedded]\nport = "abc"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load("cluster.toml", env={})
    assert str(info.value) == 'cluster.toml: nats.embedded.port: expected int in 1..65535, got "abc"'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[nats.embedded]\nport = 70000\n", "nats.embedded.port: expected int in 1..65535, got 70000"),
        ("[nats.embedded]\nport = 0\n", "nats.embedded.port: expected int in 1..65535, got 0"),
        ("[nats.embedded]\nport = true\n", "nats.embedded.port: expected int in 1..65535, got true"),
        ("[nats]\nmax_payload = 10\n", "nats.max_payload: expected int in 1024..67108864, got 10"),
        ("[discovery]\nheartbeat_interval_ms = 0\n", "discovery.heartbeat_interval_ms: expected int >= 1, got 0"),
        ("[controller]\nrequest_timeout_s = -1\n", "controller.request_timeout_s: expected float > 0.0, got -1"),
        ('[controller]\napi_keys = "abc"\n', 'controller.api_keys: expected array, got "abc"'),
        ('[nats.tls]\nenabled = "yes"\n', 'nats.tls.enabled: expected bool, got "yes"'),
        ("nats = 3\n", "nats: expected object, got 3"),
        ('[cluster]\nmode = "triple"\n', 'cluster.mode: expected one of "controller", "worker", "dual", got "triple"'),
        ('[logging]\nformat = "xml"\n', 'logging.format: expected one of "text", "json", got "xml"'),
        (
            '[nats.embedded]\nlog_level = "loud"\n',
            'nats.embedded.log_level: expected one of "debug", "info", "warning", "error", got "loud"',
        ),
        ('[[workers.static]]\nhost = "10.0.0.7"\n', "workers.static[0].name: required key is missing"),
        (
            '[[workers.static]]\nname = "a"\n[[workers.static]]\nname = "b"\nport = "x"\n',
            'workers.static[1].port: expected int in 0..65535, got "x"',
        ),
        ('[[workers.static]]\nname = "a"\ntags = [1]\n', "workers.static[0].tags[0]: expected str, got 1"),
    ],
)
def test_invalid_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert load_error(tmp_path, text) == f"{path}: {expected}"


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("[bogus]\n", "bogus", ["cluster", "nats", "controller", "worker", "workers", "logging", "metrics"]),
        ("[nats]\nbogus = 1\n", "nats.bogus", ["mode", "url", "user", "password", "token", "embedded"]),
        ("[nats.embedded]\nfoo = 1\n", "nats.embedded.foo", ["host", "port", "http_port", "jetstream"]),
        ('[[workers.static]]\nname = "a"\nfoo = 1\n', "workers.static[0].foo", ["name", "host", "port", "tags"]),
    ],
)
def test_unknown_key_lists_allowed_keys(tmp_path: Path, text: str, key: str, allowed: list[str]) -> None:
    path = write(tmp_path, text)
    message = load_error(tmp_path, text)
    assert message.startswith(f"{path}: {key}: unknown key (expected one of: ")
    listed = message.split("expected one of: ", 1)[1].rstrip(")").split(", ")
    assert set(allowed) <= set(listed)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[nats\n")
    message = load_error(tmp_path, "[nats\n")
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 1" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (chmod 000 would not stop root).
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={})
    assert str(info.value).startswith(f"{tmp_path}: cannot read: ")


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_bytes(b"\xff\xfe[nats]\n")
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(info.value).startswith(f"{path}: cannot read: ")


def test_from_dict_error_names_key() -> None:
    with pytest.raises(ConfigError, match=r"^<dict>: controller\.port: expected int in 1\.\.65535, got 0$"):
        from_dict({"controller": {"port": 0}})


# --- to_dict ----------------------------------------------------------------------------------


def test_to_dict_masks_secrets() -> None:
    config = from_dict(
        {
            "nats": {"user": "alice", "password": "pw-SECRET", "token": "tok-SECRET"},
            "controller": {"api_keys": ["k1-SECRET", "k2-SECRET"]},
        }
    )
    data = to_dict(config)
    assert data["nats"]["user"] == "alice"
    assert data["nats"]["password"] == MASK
    assert data["nats"]["token"] == MASK
    assert data["controller"]["api_keys"] == [MASK, MASK]
    assert "SECRET" not in repr(data)
    raw = to_dict(config, mask_secrets=False)
    assert raw["nats"]["password"] == "pw-SECRET"
    assert raw["controller"]["api_keys"] == ["k1-SECRET", "k2-SECRET"]


def test_to_dict_leaves_unset_secrets_out_and_round_trips() -> None:
    data = to_dict(Config())
    assert "password" not in data["nats"]
    assert "token" not in data["nats"]
    assert data["controller"]["api_keys"] == []
    assert from_dict(data) == Config()


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[worker]\nkeep_alive = "5x"\n', "worker: keep_alive: '5x' is not a duration"),
        ('[worker.model_keep_alive]\nm = "forever"\n', "worker: model_keep_alive.m: 'forever' is not a duration"),
        (
            "[worker]\nmemory_budget_gb = 1\nmemory_budget_bytes = 5\n",
            "worker: set memory_budget_bytes or memory_budget_gb",
        ),
    ],
)
def test_model_fleet_settings_are_checked(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=f"^{path}: {expected}"):
        load(path, env={})


def test_keep_alive_takes_seconds_and_durations() -> None:
    worker = from_dict({"worker": {"keep_alive": "1h30m"}}).worker
    assert worker.keep_alive_s == 5400.0
    assert from_dict({"worker": {"keep_alive": -1}}).worker.keep_alive_s == -1.0
    assert from_dict({"worker": {"keep_alive": "250ms"}}).worker.keep_alive_s == 0.25


def test_parse_duration_edges() -> None:
    from mlxcluster.durations import parse_duration

    assert parse_duration("1.5h") == 5400.0 and parse_duration("-5m") == -300.0 and parse_duration(" 30 ") == 30.0
    assert parse_duration("1m30s") == 90.0 and parse_duration(0) == 0.0
    for bad in ("", "-", "5 minutes", "1h5", True, float("nan")):
        with pytest.raises(ValueError):
            parse_duration(bad)  # type: ignore[arg-type]
