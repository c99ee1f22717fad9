# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, reuse an already installed torch (system site-packages)
# and otherwise install the CPU-friendly pin torch==2.13.0.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test bench clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,hf]"
	touch $@

venv: $(VENV)/.ready

# the whole workflow on tiny generated data, then the loss comparison; files in build/demo
demo: venv
	rm -rf build/demo
	$(PY) examples/demo.py --workdir build/demo

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.sweep

clean:
	rm -rf $(VENV) build *.egg-info
