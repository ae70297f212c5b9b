"""cluster/ and the Dockerfile: every launcher YAML validates against the schema inside the installed ray package
and declares the true CPU/GPU counts of its instance types (a planner reads them); the node types hold the
production presets (the 72B teacher at tensor parallel 8, one whole 8-worker ZeRO-3 group per train node); the
hosts get an NVIDIA driver >= 580 and every node runs the project's CUDA 13 image, which the Dockerfile builds;
the KubeRay manifest has its kind, apiVersion and required fields and a memory-backed /dev/shm on every pod; the
runtime env is one Ray accepts; nothing binds publicly beyond the cluster network."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
TEACHER, TRAIN = "gpu_8x_teacher", "gpu_8x_train"
TRAIN_WORKERS, CPUS_PER_WORKER = 8, 8  # the presets' train.num_workers x train.cpus_per_worker, 1 GPU each


def _launcher(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _kuberay():
    return yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())


def _dockerfile():
    return (ROOT / "Dockerfile").read_text()


def _gpu_node_types(config):
    return {k: n for k, n in config["available_node_types"].items() if n["resources"]["GPU"] > 0}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_validates_against_rays_schema(name):
    config = _launcher(name)
    jsonschema.validate(config, SCHEMA)
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0  # the head never holds GPUs
    workers = [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert workers and all(n["min_workers"] == 0 for n in workers)  # GPU nodes only while a stage needs them
    assert config["max_workers"] >= sum(n["max_workers"] for n in workers)
    assert config["idle_timeout_minutes"] > 0
    # Launcher heads keep the dashboard on loopback: it is reached through `ray dashboard` (an SSH tunnel).
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_node_type_declares_its_true_cpu_and_gpu_counts(name):
    config = _launcher(name)
    for key, node in config["available_node_types"].items():
        resources = node["resources"]
        assert set(resources) >= {"CPU", "GPU"}, f"{name}:{key} must declare CPU and GPU explicitly"
        assert all(type(resources[r]) is int and resources[r] >= 0 for r in ("CPU", "GPU")), (key, resources)
        assert resources["CPU"] > 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_node_types_hold_the_production_presets(name):
    config = _launcher(name)
    nodes = config["available_node_types"]
    assert config["head_node_type"] == "head" and {TEACHER, TRAIN} <= set(nodes)
    assert nodes[TEACHER]["resources"]["GPU"] >= 8  # teacher.tensor_parallel_size: 8 on one node
    train = nodes[TRAIN]["resources"]
    assert train["GPU"] == TRAIN_WORKERS  # a whole ZeRO-3 group on one node
    assert train["CPU"] >= TRAIN_WORKERS * CPUS_PER_WORKER


def test_aws_gpu_nodes_boot_an_explicit_ami():
    config = _launcher("aws.yaml")
    gpu_nodes = _gpu_node_types(config)
    assert gpu_nodes
    for key, node in gpu_nodes.items():
        image = node["node_config"].get("ImageId", "")
        assert image.startswith(("ami-", "resolve:ssm:")), f"{key} needs the DLAMI with driver >= 580"
    header = (CLUSTER / "aws.yaml").read_text()
    assert "base-oss-nvidia-driver-gpu-ubuntu-24.04" in header  # how to look the AMI id up


def test_gcp_gpu_nodes_boot_a_driver_580_image_family():
    config = _launcher("gcp.yaml")
    gpu_nodes = _gpu_node_types(config)
    assert gpu_nodes
    for key, node in gpu_nodes.items():
        disks = node["node_config"]["disks"]
        image = next(d["initializeParams"]["sourceImage"] for d in disks if d.get("boot"))
        match = re.fullmatch(r"projects/deeplearning-platform-release/global/images/family/(\S+)", image)
        assert match, f"{key}: not a Deep Learning VM image family: {image}"
        family = match.group(1)
        driver = re.search(r"-nvidia-(\d+)$", family)
        cuda = re.match(r"common-cu(\d+)", family)
        # CUDA 13 containers need driver >= 580: a family that pins it, or a CUDA 13 family.
        assert (driver and int(driver.group(1)) >= 580) or (cuda and cuda.group(1).startswith("13")), family
        assert node["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"  # an object, GPUs can't migrate


def test_every_node_runs_the_project_image_the_dockerfile_builds():
    images = {_launcher(name)["docker"]["image"] for name in LAUNCHERS}
    cluster = _kuberay()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    images |= {c["image"] for pod in pods for c in pod["spec"]["containers"]}
    assert len(images) == 1, images
    (image,) = images
    assert not image.startswith("rayproject/")  # the project's own CUDA 13 image, with leaml-ray[gpu] inside
    assert f"docker build -t {image} ." in _dockerfile() and f"docker push {image}" in _dockerfile()
    for name in LAUNCHERS:  # the image carries the project's dependencies: no per-node pip install of it
        config = _launcher(name)
        commands = config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"]
        assert not any("leaml-ray" in c for c in commands)


def test_dockerfile_builds_cuda13_python311_with_the_gpu_extra():
    dockerfile = _dockerfile()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+", base), base
    assert re.search(r"pip install[^\n]*\"\.\[gpu\]\"", dockerfile)
    assert "3.11" in dockerfile and re.search(r"useradd[^\n]*--uid 1000[^\n]* ray\b", dockerfile)
    assert re.search(r"^USER ray$", dockerfile, re.M) and re.search(r"^WORKDIR /home/ray$", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv/", "runs/", "bench/results/"} <= set(ignored)


def test_kuberay_rayjob_manifest():
    manifest = _kuberay()
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("python jobs/adapt.py")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    # 0.0.0.0 inside the head pod: the RayJob submitter pod reaches the dashboard through the head Service, which
    # KubeRay creates as ClusterIP (cluster network only); nothing here exposes it (no LoadBalancer/Ingress).
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "port-forward" in (CLUSTER / "kuberay-rayjob.yaml").read_text()
    assert "serviceType" not in head and "ingress" not in json.dumps(manifest).lower()
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {"gpu-8x-teacher", "gpu-8x-train"} <= set(groups)
    for group in groups.values():
        assert group["template"]["spec"]["containers"][0]["image"]
        assert 0 == group["minReplicas"] <= group["maxReplicas"]
    limits = {k: g["template"]["spec"]["containers"][0]["resources"]["limits"] for k, g in groups.items()}
    assert int(limits["gpu-8x-teacher"]["nvidia.com/gpu"]) >= 8
    assert int(limits["gpu-8x-train"]["nvidia.com/gpu"]) == TRAIN_WORKERS
    assert int(limits["gpu-8x-train"]["cpu"]) >= TRAIN_WORKERS * CPUS_PER_WORKER
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # raises on fields Ray does not know


def test_kuberay_pods_mount_a_memory_backed_dev_shm():
    cluster = _kuberay()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert len(mounts) == 1, f"{container['name']} has no /dev/shm mount"
            empty_dir = volumes[mounts[0]["name"]].get("emptyDir")
            assert empty_dir and empty_dir["medium"] == "Memory" and empty_dir["sizeLimit"]
    teacher = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-8x-teacher")
    (shm,) = teacher["template"]["spec"]["volumes"]
    assert shm["emptyDir"]["sizeLimit"] == "64Gi"  # NCCL at tensor parallel 8


def test_runtime_env_is_valid_and_holds_no_secrets():
    text = (CLUSTER / "runtime_env.yaml").read_text()
    RuntimeEnv(**yaml.safe_load(text))
    for path in [*CLUSTER.iterdir(), ROOT / "Dockerfile", ROOT / ".dockerignore"]:
        body = path.read_text()
        for secret in ("HF_TOKEN:", "HF_TOKEN=", "AWS_SECRET_ACCESS_KEY", "AKIA", "hf_"):
            assert secret not in body, f"{path.name} holds what looks like a secret ({secret})"
