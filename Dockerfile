# The leaml-ray GPU image: every node of cluster/aws.yaml, cluster/gcp.yaml and cluster/kuberay-rayjob.yaml runs it.
#   docker build -t YOUR-REGISTRY/leaml-ray:gpu .
#   docker push YOUR-REGISTRY/leaml-ray:gpu
# (YOUR-REGISTRY: e.g. an ECR repository, REGION-docker.pkg.dev/PROJECT/REPO, or a Docker Hub account.)
#
# CUDA 13.0 because torch 2.13.0 from PyPI is a CUDA 13.0 build: the hosts need an NVIDIA driver >= 580.
# devel (not runtime): DeepSpeed and Triton compile ops just in time (nvcc, headers, g++).
# Python 3.11 (the project requires >=3.11,<3.12) from uv, in a venv owned by the `ray` user (uid 1000, like the
# rayproject images) so the Ray launcher's setup commands and runtime_env pip installs can write to it.
# The project is installed with its gpu extra; each job still ships its working dir (ray job submit --working-dir).
# No secrets here: HF_TOKEN and cloud credentials come from instance roles / Kubernetes Secrets at run time.
FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /uvx /usr/local/bin/

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    TZ=Etc/UTC

# build-essential: DeepSpeed / Triton JIT builds; openssh-client + rsync: the Ray launcher's head reaches workers
# and copies files into containers with them; sudo: rayproject images give `ray` passwordless sudo, so do we.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential ca-certificates curl git openssh-client rsync sudo tzdata \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu 24.04 images ship a user `ubuntu` with uid 1000: replace it with `ray`.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --shell /bin/bash ray \
    && echo "ray ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/ray \
    && chmod 0440 /etc/sudoers.d/ray

USER ray
WORKDIR /home/ray
ENV UV_PYTHON_INSTALL_DIR=/home/ray/.python \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/home/ray/venv \
    PATH=/home/ray/venv/bin:/home/ray/.local/bin:$PATH
RUN uv python install 3.11 \
    && uv venv --seed --python 3.11 /home/ray/venv

# Dependencies first, against a stub package, so this heavy layer is cached while only leaml_ray/ changes.
# boto3 / google-api-python-client: the Ray autoscaler running on a launcher head talks to EC2 / GCE with them.
COPY --chown=ray:ray pyproject.toml README.md /home/ray/src/
RUN cd /home/ray/src && mkdir -p leaml_ray && touch leaml_ray/__init__.py \
    && uv pip install --no-cache ".[gpu]" boto3 "google-api-python-client==1.7.8"
# Then the package itself (its presets included).
COPY --chown=ray:ray leaml_ray /home/ray/src/leaml_ray
RUN cd /home/ray/src \
    && uv pip install --no-cache --no-deps --reinstall-package leaml-ray . \
    && cd /home/ray && python -c "import torch, ray, leaml_ray; assert torch.version.cuda.startswith('13'), torch.version.cuda"

CMD ["/bin/bash"]
