"""cluster/ and the Dockerfile: every launcher YAML validates against the schema inside the installed ray package
and declares the true CPU/GPU counts of its instance types (a planner reads them); the node types hold the
production presets (the 72B teacher's two tensor-parallel-4 replicas on one node, one whole 8-worker ZeRO-3 group
per train node); the hosts get an NVIDIA driver >= 580 and every node runs the project's CUDA 13 image, which the
Dockerfile builds; the GPU workers keep the model caches (LEAML_CACHE, HF_HOME) on local NVMe; the KubeRay manifest
has its kind, apiVersion and required fields and a memory-backed /dev/shm on every pod; the runtime env is one Ray
accepts; nothing binds publicly beyond the cluster network."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from leaml_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
TEACHER, TRAIN = "gpu_8x_teacher", "gpu_8x_train"
TRAIN_WORKERS, CPUS_PER_WORKER = 8, 8  # the presets' train.num_workers x train.cpus_per_worker, 1 GPU each
# the model caches of the GPU workers' containers: on local NVMe, mounted here (leaml_ray/storage.py reads
# LEAML_CACHE, huggingface_hub HF_HOME)
NVME, CACHES = "/mnt/nvme", {"LEAML_CACHE": "/mnt/nvme/leaml-ray", "HF_HOME": "/mnt/nvme/huggingface"}
# where the host has its local NVMe: the DLAMI's instance store mount; the RAID 0 of GCP's Local SSDs
HOST_NVME = {"aws.yaml": "/opt/dlami/nvme", "gcp.yaml": "/mnt/nvme"}


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
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher(name)
    jsonschema.validate(config, SCHEMA)
    validate_config(prepare_config(config))  # what `ray up` does with it: defaults filled in, schema and own checks
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
    for preset in ("kvasir-vqa-1pct", "sportu-1pct"):
        # every teacher replica (tensor x pipeline parallel GPUs) of a preset on one teacher node: 2 x 4
        teacher = load_config(preset).teacher
        gpus = teacher.tensor_parallel_size * teacher.pipeline_parallel_size
        assert (gpus, teacher.replicas) == (4, 2)
        assert nodes[TEACHER]["resources"]["GPU"] >= gpus * teacher.replicas
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
    (shm,) = [v for v in teacher["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["sizeLimit"] == "64Gi"  # NCCL at tensor parallel 4 (two engines) and vLLM's queues


def _worker_docker_run(config: dict, node_type: str) -> tuple[dict[str, str], dict[str, str]]:
    """The bind mounts (container path: host path) and environment of the `docker run` that starts a worker of
    `node_type`, built as Ray's launcher builds it: the node type's `docker` section over the global one
    (StandardAutoscaler._get_node_specific_docker_config), run_options + worker_run_options
    (DockerCommandRunner.run_init), then ray's own docker_start_cmds."""
    from ray.autoscaler._private.docker import docker_start_cmds

    docker = {**config["docker"], **config["available_node_types"][node_type].get("docker", {})}
    options = docker.get("run_options", []) + docker.get("worker_run_options", [])
    command = docker_start_cmds(
        "ubuntu", docker["image"], {}, docker["container_name"], options, config["cluster_name"], "/home/ray", "docker"
    )
    words = shlex.split(command)
    mounts, env = {}, {}
    for flag, value in zip(words, words[1:], strict=False):
        if flag == "-v":
            host, container = value.split(":")[:2]
            mounts[container] = host
        elif flag in ("-e", "--env"):
            key, _, val = value.partition("=")
            env[key] = val
    return mounts, env


@pytest.mark.parametrize("name", LAUNCHERS)
def test_gpu_worker_containers_keep_the_model_caches_on_local_nvme(name, monkeypatch):
    from leaml_ray.storage import _model_cache_root

    config = _launcher(name)
    host = HOST_NVME[name]
    for key in _gpu_node_types(config):
        mounts, env = _worker_docker_run(config, key)
        assert mounts[NVME] == host, (key, mounts)
        assert {k: env.get(k) for k in CACHES} == CACHES, (key, env)
        # on the host, before the container starts: both folders exist and belong to the image's `ray` user
        init = " ; ".join(config["available_node_types"][key]["initialization_commands"])
        folders = f"{host}/leaml-ray {host}/huggingface"
        assert f"sudo mkdir -p {folders}" in init and f"sudo chown 1000:1000 {folders}" in init, key
    assert "--uid 1000" in _dockerfile()
    # the head's container gets none of it (head_run_options / the global docker section)
    head_options = config["docker"].get("run_options", []) + config["docker"].get("head_run_options", [])
    assert not any(NVME in option for option in head_options)
    # the code's cache of s3:// / gs:// model folders is then on the NVMe
    monkeypatch.setenv("LEAML_CACHE", CACHES["LEAML_CACHE"])
    assert _model_cache_root(None) == "/mnt/nvme/leaml-ray/models"


def test_aws_caches_wait_for_the_dlami_instance_store_mount():
    """The DLAMI mounts the instance store at /opt/dlami/nvme (its release notes' nvme_location); p5 and p4d have
    one, which EC2 attaches without a block device mapping."""
    config = _launcher("aws.yaml")
    for key, node in _gpu_node_types(config).items():
        assert node["node_config"]["InstanceType"] in ("p5.48xlarge", "p4d.24xlarge")
        (wait, _) = node["initialization_commands"]
        assert "mountpoint -q /opt/dlami/nvme && break" in wait, key


def test_gcp_gpu_nodes_raid_and_mount_their_local_nvme_ssds():
    config = _launcher("gcp.yaml")
    zone = config["provider"]["availability_zone"]
    nodes = _gpu_node_types(config)
    # A2 Ultra brings its own Local SSD; A2 Standard gets 8 x 375 GB only when the instance asks for them
    assert nodes[TEACHER]["node_config"]["machineType"] == "a2-ultragpu-8g"
    assert [d for d in nodes[TEACHER]["node_config"]["disks"] if d["type"] == "SCRATCH"] == []
    scratch = [d for d in nodes[TRAIN]["node_config"]["disks"] if d["type"] == "SCRATCH"]
    assert len(scratch) == 8
    for disk in scratch:
        assert disk["interface"] == "NVME" and disk["autoDelete"] is True
        assert disk["initializeParams"]["diskType"] == f"zones/{zone}/diskTypes/local-ssd"
    for node in nodes.values():
        mount, _ = node["initialization_commands"]
        assert mount.startswith("if ! mountpoint -q /mnt/nvme; then")  # once: a mounted array is left alone
        assert "/dev/disk/by-id/google-local-nvme-ssd-*" in mount and "grep -v -- -part" in mount
        assert "mdadm --create $dev --name=leaml-nvme --level=0 --raid-devices=$n" in mount
        assert "blkid $dev >/dev/null || sudo mkfs.ext4" in mount  # never reformats an existing filesystem
        assert "mount -o discard,defaults $dev /mnt/nvme" in mount


def test_kuberay_gpu_workers_keep_the_model_caches_on_node_local_storage():
    cluster = _kuberay()["spec"]["rayClusterSpec"]
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) > 0
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in CACHES} == CACHES, group["groupName"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == NVME]
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        # an emptyDir on the node's disk (its ephemeral storage: local NVMe on a pool set up so), not memory
        assert "medium" not in volume["emptyDir"] and volume["emptyDir"]["sizeLimit"], group["groupName"]


def test_runtime_env_is_valid_and_holds_no_secrets():
    text = (CLUSTER / "runtime_env.yaml").read_text()
    RuntimeEnv(**yaml.safe_load(text))
    for path in [*CLUSTER.iterdir(), ROOT / "Dockerfile", ROOT / ".dockerignore"]:
        body = path.read_text()
        for secret in ("HF_TOKEN:", "HF_TOKEN=", "AWS_SECRET_ACCESS_KEY", "AKIA", "hf_"):
            assert secret not in body, f"{path.name} holds what looks like a secret ({secret})"
