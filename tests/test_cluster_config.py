"""ray_cluster.yaml is checked by Ray's own cluster-config schema validator, after Ray fills in its defaults."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def load():
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_config_validates():
    config = prepare_config(load())
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types)
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert any("pip install" in c and "videopoet" in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()


def test_validator_rejects_a_broken_config():
    config = copy.deepcopy(load())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_dashboard_on_loopback_and_token_auth_on_every_node():
    config = load()
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert "0.0.0.0" not in CONFIG.read_text()
    assert any("--head" in c and "--dashboard-host=127.0.0.1" in c for c in starts)
    assert all(c.startswith("RAY_AUTH_MODE=token ") for c in starts if c.split()[-1] != "stop")
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
