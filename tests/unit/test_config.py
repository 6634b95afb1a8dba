"""Configuration: defaults, files (later wins), overrides, and errors that name the option."""

from pathlib import Path

import pytest

from router.config import Config, ConfigError, render_sample

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_defaults(tmp_path):
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}})
    assert config.api.host == "127.0.0.1" and config.api.port == 7070
    assert config.api.public_url == "http://127.0.0.1:7070"
    assert config.database.connection == f"sqlite+aiosqlite:///{tmp_path / 'headwater.db'}"
    assert config.bus.backend == "sqlite" and config.engine.backend == "local"
    assert config.storage.file_system_dir == tmp_path / "packages"
    assert config.resource_limits.default_timeout == 5


def test_files_later_wins_and_overrides_win_over_files(tmp_path):
    a = tmp_path / "a.conf"
    b = tmp_path / "b.conf"
    a.write_text("[api]\nport = 8000\nhost = 0.0.0.0\n[bus]\nbackend = nats\n")
    b.write_text("[api]\nport = 9000\n")
    config = Config.load([a, b], {"api": {"host": "127.0.0.2"}})
    assert config.api.port == 9000 and config.api.host == "127.0.0.2" and config.bus.backend == "nats"
    assert config.files == (str(a), str(b))


@pytest.mark.parametrize("text, fault", [
    ("[api]\nport = seventy\n", r"\[api\] port"),
    ("[api]\nport = 70000\n", r"\[api\] port .* above the maximum"),
    ("[api]\nprot = 1\n", r"unknown option \[api\] prot"),
    ("[nonsense]\nx = 1\n", r"unknown section \[nonsense\]"),
    ("[DEFAULT]\nlog_level = LOUD\n", r"\[DEFAULT\] log_level .* not one of"),
    ("[database]\nconnection = just-a-path\n", r"\[database\] connection"),
    ("[resource_limits]\ndefault_cpu = 500\n", r"default_cpu = 500 must lie within"),
    ("[engine]\nlocal_runtimes = python\n", r"\[engine\] local_runtimes"),
    ("not an ini file", r"not valid INI"),
])
def test_bad_values_name_the_option(tmp_path, text, fault):
    path = tmp_path / "bad.conf"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fault):
        Config.load([path])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(["/no/such/headwater.conf"])


def test_secrets_are_masked_in_the_summary(tmp_path):
    config = Config.load(overrides={"bus": {"url": "amqp://guest:secret@127.0.0.1:5672/"}, "DEFAULT": {"data_dir": str(tmp_path)}})
    assert config.summary()["bus"]["url"] == "amqp://guest:***@127.0.0.1:5672/"


def test_sample_file_documents_every_option():
    assert (ROOT / "etc" / "headwater.conf.sample").read_text() == render_sample(), \
        "etc/headwater.conf.sample is stale: run `headwater config-sample > etc/headwater.conf.sample`"
