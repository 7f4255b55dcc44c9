# The two commands a newcomer needs: `make demo` and `make test`. Both install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Headless MuJoCo rendering (software EGL works on CPU-only machines).
export MUJOCO_GL ?= egl
export HF_HUB_OFFLINE := 1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulls GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/foresight-demo

test: install
	$(BIN)/pytest -q -n 2

bench: install
	$(BIN)/foresight-bench env

clean:
	rm -rf $(VENV) outputs
