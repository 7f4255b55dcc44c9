# The two commands a newcomer needs: `make demo` and `make test`. Both install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Headless MuJoCo rendering (software EGL works on CPU-only machines); no hub downloads.
export MUJOCO_GL ?= egl
export HF_HUB_OFFLINE := 1
# The CPU build of torch lies here on this project's machines; elsewhere pip uses its index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: install demo test bench experts clean

install: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulls GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/pip install -q $(FIND_LINKS) -e '.[dev]'
	touch $@

# Until the planner lands: one expert episode per task family, as captioned videos.
demo: install
	$(BIN)/foresight-experts episodes=1 video=true hydra.run.dir=outputs/demo
	@echo "videos: outputs/demo/videos/"

test: install
	$(BIN)/pytest -q -n 2

bench: install
	$(BIN)/foresight-bench env

# The README's expert figures: 200 fresh-seed episodes per task family.
experts: install
	$(BIN)/foresight-experts episodes=200 hydra.run.dir=outputs/experts_200

clean:
	rm -rf $(VENV) outputs
