# Two commands a new user runs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch: an unpinned torch would pull a multi-GB CUDA build.
# Versions match the GPU kit (../shared/gpu/kit.sh) so CPU and GPU runs exercise the same libraries.
PINS := torch==2.13.0 transformers==5.24.0 accelerate==1.15.0 bitsandbytes==0.50.2 torchao==0.18.0

.PHONY: demo test test-fast venv clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PINS) 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q --disable-pip-version-check -e ".[run,plot,serve,finetune,test]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "from heavylift import quiet; quiet.third_party(verbose=False); import torch, transformers, bitsandbytes, torchao"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/heavylift plan llama3.1-405b --gpus 8xH100 --context 8192
	$(VENV)/bin/heavylift plan llama3.1-8b --context 8192

test: venv
	$(PY) -m pytest -q

# Everything but the engine's Triton-interpreter tests (marked `interpreter`): a few minutes less.
test-fast: venv
	$(PY) -m pytest -q -m "not interpreter"

clean:
	rm -rf $(VENV)
