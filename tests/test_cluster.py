"""cluster/: every launcher YAML validates against the schema inside the installed ray package; the KubeRay
manifest has its kind, apiVersion and required fields; the runtime env is one Ray accepts; nothing binds publicly."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_validates_against_rays_schema(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, SCHEMA)
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # the head never holds GPUs
    workers = [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert workers and all(n["min_workers"] == 0 for n in workers)  # GPU nodes only while a stage needs them
    assert config["idle_timeout_minutes"] > 0
    assert any("leaml-ray[gpu]" in c for c in config["setup_commands"])
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_kuberay_rayjob_manifest():
    manifest = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("python jobs/adapt.py")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["template"]["spec"]["containers"][0]["image"]
        assert 0 == group["minReplicas"] <= group["maxReplicas"]
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # raises on fields Ray does not know


def test_runtime_env_is_valid_and_holds_no_secrets():
    text = (CLUSTER / "runtime_env.yaml").read_text()
    RuntimeEnv(**yaml.safe_load(text))
    for path in CLUSTER.iterdir():
        body = path.read_text()
        for secret in ("HF_TOKEN:", "AWS_SECRET_ACCESS_KEY", "AKIA", "hf_"):
            assert secret not in body, f"{path.name} holds what looks like a secret ({secret})"
