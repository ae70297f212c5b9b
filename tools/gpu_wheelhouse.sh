#!/usr/bin/env bash
# Build .gpu-wheels/: what bench/gpu_smoke.py needs on the one-GPU check machine beyond what that machine has.
#
# That machine has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, peft, accelerate and their install
# dependencies (numpy, pyyaml, safetensors, tokenizers, huggingface_hub, packaging, psutil, tqdm, ...), but no
# DeepSpeed, nothing can be downloaded there, and a call carries at most 64 MiB (working tree + carried paths).
# So: DeepSpeed as a pure-Python wheel built from its sdist (no compiled ops: the smoke uses torch's AdamW), its
# pure-Python dependencies, pydantic (leaml_ray.config) and pillow (leaml_ray.data), as cp312 manylinux wheels.
# torchvision (transformers' Qwen2-VL image and video processors import it) goes to if-missing/: installed only
# where the machine has none, since it must be the build that matches torch 2.11 exactly.
#
#   bash tools/gpu_wheelhouse.sh        # here (idempotent), then on the GPU machine, carrying .gpu-wheels:
#   python -m pip install -q -U --no-index --no-deps --target /tmp/gpu-deps .gpu-wheels/*.whl $(python -c 'import torchvision' 2>/dev/null || echo .gpu-wheels/if-missing/*.whl) && PYTHONPATH=/tmp/gpu-deps python bench/gpu_smoke.py
#
# --no-deps + --target leaves the machine's torch/transformers/peft untouched (nothing is resolved against them).
# GPU_PYTHON, TORCHVISION and WHEELHOUSE retarget it (e.g. a Python 3.11 rehearsal next to torch 2.13: 3.11, 0.28.0).
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_PYTHON=${GPU_PYTHON:-3.12}
TORCHVISION=${TORCHVISION:-0.26.0} # the release paired with torch 2.11
OUT=${WHEELHOUSE:-.gpu-wheels}
PY=.venv/bin/python # any pip works: nothing is installed here
[ -x "$PY" ] || PY=python3
ABI=cp${GPU_PYTHON/./}

# versions as in this project's .venv (requirements/cpu.lock), each with a wheel for the GPU machine's Python
PURE=(
    hjson==3.1.0
    py-cpuinfo==9.0.0
    einops==0.8.2
    pydantic==2.14.4
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0 # pydantic 2.14 needs >=4.16; torch only brings >=4.10
)
BINARY=(
    msgpack==1.2.4
    ninja==1.13.2 # declared by DeepSpeed; only its JIT op builds use it (none here)
    pydantic-core==2.50.5
    pillow==13.0.0
)

mkdir -p "$OUT/if-missing"
download() { # dest, requirements...: wheels for the GPU machine's interpreter and platform, no dependency resolution
    local dest=$1
    shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$dest" \
        --python-version "$GPU_PYTHON" --implementation cp --abi "$ABI" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform any "$@"
}

if ! compgen -G "$OUT/deepspeed-0.19.8-*.whl" >/dev/null; then
    # its sdist builds a pure-Python wheel when no op is prebuilt
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --wheel-dir "$OUT" deepspeed==0.19.8
fi
download "$OUT" "${PURE[@]}" "${BINARY[@]}"
download "$OUT/if-missing" "torchvision==$TORCHVISION"

ls -l "$OUT"/*.whl "$OUT"/if-missing/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 2^20, $NF}'
bytes=$(du -cb "$OUT" | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "wheelhouse $OUT: $((bytes / 2**20)) MiB; with the working tree: $(((bytes + tree) / 2**20)) MiB (a call carries 64)"
if [ $((bytes + tree)) -gt $((60 * 2**20)) ]; then
    echo "too large for one device call" >&2
    exit 1
fi
