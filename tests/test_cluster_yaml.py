"""cluster.yaml passes Ray's own cluster-config validation (what `ray up` runs) and keeps its promises:
a CPU head, autoscaling GPU workers, the project installed, token auth, a private MLflow server, no public
dashboard."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validated(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))  # defaults for the provider, as `ray up` does
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validation(config):
    prepared = validated(config)
    assert prepared["provider"]["type"] == "aws"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    workers = [
        t for name, t in prepared["available_node_types"].items() if name != prepared["head_node_type"]
    ]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)  # autoscaling from 0


def test_validation_rejects_a_broken_copy(config):
    from jsonschema import ValidationError

    bad = copy.deepcopy(config)
    bad["available_node_types"]["ray.worker.gpu"]["min_workers"] = "zero"
    with pytest.raises(ValidationError, match="zero"):
        validated(bad)
    bad = copy.deepcopy(config)
    bad["head_node_typ"] = "ray.head.cpu"
    with pytest.raises(ValidationError, match="head_node_typ"):
        validated(bad)


def test_cluster_yaml_installs_the_project_and_keeps_services_private(config):
    setup = " ".join(config["setup_commands"])
    assert "/home/ubuntu/invdyn[pipeline]" in setup and config["file_mounts"]["/home/ubuntu/invdyn"] == "."
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "mlflow server" in head and "--serve-artifacts" in head and "hostname -I" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in " ".join(
        config["worker_start_ray_commands"]
    )
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]
