"""Settings: flags over environment over defaults, and one clear line per bad value."""

from pathlib import Path

import pytest

from cylindria import cli
from cylindria.config import ConfigError, Settings, load_settings


def test_defaults():
    s = load_settings({}, {})
    assert (s.host, s.port, s.comfy_url, s.num_gpus) == ("127.0.0.1", 8000,
                                                        "http://127.0.0.1:8188", 1)
    assert s.api_key is None and s.dev_mode is False
    assert s.dev_save_dir == Path("./workflows_dev")


def test_environment_over_defaults_and_flags_over_environment():
    env = {"COMFYUI_BASE_URL": "http://127.0.0.1:9000", "CYLINDRIA_NUM_GPUS": "4",
           "CYLINDRIA_API_KEY": "config-test-key-7Qx", "CYLINDRIA_DEV_MODE": "true",
           "CYLINDRIA_DEV_SAVE_DIR": "/tmp/wf"}
    s = load_settings({}, env)
    assert (s.comfy_url, s.num_gpus, s.api_key, s.dev_mode, s.dev_save_dir) == (
        "http://127.0.0.1:9000", 4, "config-test-key-7Qx", True, Path("/tmp/wf"))
    s = load_settings({"comfy_url": "http://127.0.0.1:7000/", "num_gpus": 2,
                       "dev_save_dir": "/tmp/other"}, env)
    assert (s.comfy_url, s.num_gpus, s.dev_save_dir) == ("http://127.0.0.1:7000", 2,
                                                          Path("/tmp/other"))


def test_gpu_n_is_the_base_port_plus_n():
    s = Settings(comfy_url="http://127.0.0.1:8188", num_gpus=3)
    assert s.gpu_urls == ["http://127.0.0.1:8188", "http://127.0.0.1:8189",
                          "http://127.0.0.1:8190"]
    assert Settings(comfy_url="http://[::1]:8188").gpu_url(0) == "http://[::1]:8188"


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"num_gpus": 0}, "--numberOfGpus / CYLINDRIA_NUM_GPUS must be between 1 and 8"),
    ({"num_gpus": 9}, "--numberOfGpus / CYLINDRIA_NUM_GPUS must be between 1 and 8"),
    ({"port": 0}, "port must be between 1 and 65535"),
    ({"port": 70000}, "port must be between 1 and 65535"),
    ({"comfy_url": "127.0.0.1:8188"}, "must look like http://HOST:PORT"),
    ({"comfy_url": "http://127.0.0.1"}, "must include a port"),
    ({"comfy_url": "http://127.0.0.1:7999", "num_gpus": 2}, "include Cylindria's own"),
    ({"comfy_url": "http://localhost:8000"}, "include Cylindria's own"),
    ({"host": "0.0.0.0"}, "CYLINDRIA_API_KEY is not set"),
    ({"log_level": "loud"}, "log-level must be one of"),
])
def test_bad_values_name_the_setting_and_range(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        Settings(**kwargs)


def test_open_host_is_allowed_with_a_key_or_explicitly_insecure():
    Settings(host="0.0.0.0", api_key="secret")
    Settings(host="0.0.0.0", insecure_no_auth=True)


def test_bad_environment_values_are_reported():
    with pytest.raises(ConfigError, match="CYLINDRIA_NUM_GPUS must be a whole number"):
        load_settings({}, {"CYLINDRIA_NUM_GPUS": "two"})
    with pytest.raises(ConfigError, match="CYLINDRIA_DEV_MODE"):
        load_settings({}, {"CYLINDRIA_DEV_MODE": "maybe"})


def test_cli_accepts_both_spellings_of_the_gpu_flag():
    parser = cli.build_parser()
    assert parser.parse_args(["serve", "--numberOfGpus", "3"]).num_gpus == 3
    assert parser.parse_args(["serve", "--number-of-gpus", "4"]).num_gpus == 4


def test_cli_stops_with_one_clear_line(capsys, monkeypatch):
    monkeypatch.delenv("CYLINDRIA_NUM_GPUS", raising=False)
    assert cli.main(["serve", "--numberOfGpus", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cylindria: error: --numberOfGpus must be between 1 and 8 (got 9)"]


def test_cli_refuses_open_host_without_key(capsys, monkeypatch):
    monkeypatch.delenv("CYLINDRIA_API_KEY", raising=False)
    assert cli.main(["--host", "0.0.0.0"]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err


def test_messages_name_the_flag_or_the_variable_that_was_used():
    with pytest.raises(ConfigError, match=r"^--comfy-url must include a port"):
        load_settings({"comfy_url": "http://127.0.0.1"}, {})
    with pytest.raises(ConfigError, match=r"^COMFYUI_BASE_URL must include a port"):
        load_settings({}, {"COMFYUI_BASE_URL": "http://127.0.0.1"})
    with pytest.raises(ConfigError, match=r"^CYLINDRIA_NUM_GPUS must be between 1 and 8"):
        load_settings({}, {"CYLINDRIA_NUM_GPUS": "12"})


def test_the_dispatch_settings_come_from_the_environment():
    s = load_settings({}, {})
    assert (s.gpu_prefetch, s.max_held, s.priority_aging, s.model_window) == (
        0, 10_000, 60.0, 8)
    s = load_settings({}, {"CYLINDRIA_GPU_PREFETCH": "1", "CYLINDRIA_MAX_HELD": "50",
                           "CYLINDRIA_PRIORITY_AGING": "2.5", "CYLINDRIA_MODEL_WINDOW": "1"})
    assert (s.gpu_prefetch, s.max_held, s.priority_aging, s.model_window) == (1, 50, 2.5, 1)
    for name, bad in [("CYLINDRIA_GPU_PREFETCH", "-1"), ("CYLINDRIA_MAX_HELD", "0"),
                      ("CYLINDRIA_PRIORITY_AGING", "0"), ("CYLINDRIA_MODEL_WINDOW", "0")]:
        with pytest.raises(ConfigError, match=name):
            load_settings({}, {name: bad})


def test_a_database_url_keeps_the_jobs_and_the_state_file_places_the_inputs():
    url = "postgresql://cylindria:pw@db.internal:5432/cylindria"
    s = load_settings({}, {})
    assert s.database_url is None
    s = load_settings({}, {"CYLINDRIA_DATABASE_URL": url,
                           "CYLINDRIA_STATE_FILE": "/var/lib/c/state.sqlite3"})
    assert s.database_url == url and s.input_dir == Path("/var/lib/c/state-inputs")
    flag = "postgres://other@127.0.0.1/jobs"
    assert load_settings({"database_url": flag}, {"CYLINDRIA_DATABASE_URL": url}
                         ).database_url == flag
    # --no-state keeps jobs in memory, whatever the environment says.
    s = load_settings({"no_state": True}, {"CYLINDRIA_DATABASE_URL": url})
    assert s.database_url is None and s.state_file is None
    with pytest.raises(ConfigError, match=r"^--no-state keeps jobs in memory only"):
        load_settings({"no_state": True, "database_url": url}, {})
    with pytest.raises(ConfigError, match=r"CYLINDRIA_DATABASE_URL must start with "
                                          r"postgresql://; give it as postgresql://"):
        load_settings({}, {"CYLINDRIA_DATABASE_URL": "sqlite:///x.db"})
