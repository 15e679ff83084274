"""cluster.yaml checked with Ray's own cluster-launcher validation."""

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)  # raises on any schema violation
    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and {"cpu_worker", "gpu_worker"} <= set(nodes)
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= nodes[name]["min_workers"] <= nodes[name]["max_workers"]
    assert nodes["head"]["resources"] == {"CPU": 0}  # drivers only: work goes to workers
    # nodes install the project the way the README does, from the mounted repository
    assert any("make setup" in command for command in prepared["setup_commands"])
    assert prepared["file_mounts"]["~/tessera"] == "."
