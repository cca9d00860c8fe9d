"""Config files: valid profiles load; every error names the file, the field and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", sorted((ROOT / "firmware_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profiles_are_valid(profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMERA", "cam1")
    cfg = load_config(profile)
    assert cfg.device_id and cfg.source.uri and cfg.model.package.is_absolute()


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


GOOD = """
device_id: cam-01
fleet: shop
source: {uri: "camera:0"}
model: {package: ./pkg}
mqtt: {url: "mqtt://broker:1883"}
"""


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.model.package == tmp_path / "pkg"
    assert cfg.mqtt.host == "broker" and cfg.mqtt.port == 1883 and not cfg.mqtt.tls


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("mqtt://broker:1883", "tcp://broker"), "mqtt.url: must look like mqtt://"),
        (GOOD.replace("cam-01", "cam/01"), "device_id: String should match pattern"),
        (
            GOOD + "telemetry: {window_seconds: -5}\n",
            "telemetry.window_seconds: Input should be greater than 0",
        ),
        (GOOD + "colour: blue\n", "colour: Extra inputs are not permitted"),
        (GOOD.replace("model: {package: ./pkg}", ""), "model: Field required"),
        (GOOD + "mqtt: {url: 'mqtt://b', cert: a.crt}\n", "mqtt: Value error"),
        ("device_id: [unclosed\n", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_errors_name_file_field_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert expected.split(":")[0] in msg
    if "Value error" not in expected:
        assert expected in msg, msg


def test_missing_file_and_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    monkeypatch.delenv("EF_TEST_UNSET", raising=False)
    p = _write(tmp_path, GOOD.replace("cam-01", "${EF_TEST_UNSET}"))
    with pytest.raises(ConfigError, match=r"EF_TEST_UNSET\} is not set"):
        load_config(p)
    monkeypatch.setenv("EF_TEST_UNSET", "cam-77")
    assert load_config(p).device_id == "cam-77"
    p2 = _write(tmp_path, GOOD.replace("cam-01", "${EF_TEST_OTHER:-cam-default}"))
    assert load_config(p2).device_id == "cam-default"


def test_env_substitution_is_in_values_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A comment naming an unset variable is only a comment; a plain ``${VAR}`` takes the type of its text,
    a quoted one stays a string; a variable's text cannot add keys; an unset one names its line."""
    from edge_agent.config_files import read_yaml

    monkeypatch.delenv("EF_TEST_UNSET", raising=False)
    monkeypatch.setenv("EF_TEST_PORT", "1884")
    monkeypatch.setenv("EF_TEST_INJECT", "x\nfleet: other")
    text = (
        "# set ${EF_TEST_UNSET} to change the device\n"
        "device_id: cam-01  # or ${EF_TEST_UNSET}\n"
        "port: ${EF_TEST_PORT}\n"
        "quoted: '${EF_TEST_PORT}'\n"
        "name: ${EF_TEST_INJECT}\n"
        "list: [a, '${EF_TEST_PORT:-0}']\n"
    )
    data = read_yaml(_write(tmp_path, text))
    assert data == {
        "device_id": "cam-01",
        "port": 1884,
        "quoted": "1884",
        "name": "x\nfleet: other",
        "list": ["a", "1884"],
    }
    p = _write(tmp_path, GOOD + "extra: ${EF_TEST_UNSET}\n")
    with pytest.raises(
        ConfigError, match=r"agent.yaml: line 7: environment variable \$\{EF_TEST_UNSET\} is not set"
    ):
        read_yaml(p)
    monkeypatch.setenv("CAMERA_PORT", "1885")
    cfg = load_config(_write(tmp_path, GOOD.replace("broker:1883", "broker:${CAMERA_PORT}")))
    assert cfg.mqtt.port == 1885
