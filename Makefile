# spp_triton: `make demo` and `make test` set everything up on a fresh machine, idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
# The setup is redone only when one of these changes.
SETUP_INPUTS := pyproject.toml requirements/pins.txt spp_triton/cli/install_detectron2.py

.PHONY: setup test demo lint fuzz clean gpu-check

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "pip<25"
	$(PY) -m pip install -q -r requirements/pins.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-build-isolation -c requirements/pins.txt -e ".[dev]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) tools/compare_heads.py --seeds 2 --output-dir output/demo

fuzz: setup
	$(PY) tools/fuzz.py --cases 10000

# One-shot GPU check (README "GPU check"): no set-up, the plain $(PYTHON) of the GPU machine.
gpu-check:
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

lint: setup
	$(PY) -m ruff check spp_triton tools tests benchmarks
	$(PY) -m ruff format --check spp_triton tools tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis output
