# The two commands a newcomer needs: `make demo` and `make test`. Both install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Headless MuJoCo rendering (software EGL works on CPU-only machines); no hub downloads.
export MUJOCO_GL ?= egl
export HF_HUB_OFFLINE := 1
# The CPU build of torch lies here on this project's machines; elsewhere pip uses its index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: install demo test bench experts train evaluate clean

install: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulls GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/pip install -q $(FIND_LINKS) -e '.[dev]'
	touch $@

# The main job on the shipped checkpoints: the VLA alone, then VLA-seeded CEM, on the same
# 10 fresh reach, push-to-pad and two-step episodes each; a success table, results.json and videos.
demo: install
	$(BIN)/foresight-control modes=[vla,vla_cem] families=[reach,push_to_pad,two_step] episodes=10 hydra.run.dir=outputs/demo
	@echo "videos: outputs/demo/videos/"

# Two test workers on two cores: one torch thread each, or they fight over the cores.
test: install
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2

bench: install
	$(BIN)/foresight-bench env

# The README's expert figures: 200 fresh-seed episodes per task family.
experts: install
	$(BIN)/foresight-experts episodes=200 hydra.run.dir=outputs/experts_200

# The default recipe: data (and, for foresight-score's models, more push-to-pad and two-step episodes), then world model,
# goal model, done model, foresight-score's done model and scoring world model (its predictor trained for
# long rollouts against that done model), decoder and VLA into checkpoints/tabletop/.
train: install
	$(BIN)/foresight-collect episodes=4000 policy=mixture out=data/tabletop.h5 hydra.run.dir=outputs/collect/train
	$(BIN)/foresight-collect episodes=200 policy=mixture seed=900000 out=data/tabletop_eval.h5 hydra.run.dir=outputs/collect/eval
	$(BIN)/foresight-collect 'env.tasks=[push_to_pad]' episodes=8000 policy=mixture seed=100000 out=data/tabletop_pads.h5 hydra.run.dir=outputs/collect/pads
	$(BIN)/foresight-collect 'env.tasks=[two_step]' episodes=4000 policy=mixture seed=200000 out=data/tabletop_two_step.h5 hydra.run.dir=outputs/collect/two_step
	$(BIN)/foresight-train target=world_model
	$(BIN)/foresight-train target=goal
	$(BIN)/foresight-train target=done
	$(BIN)/foresight-train target=scoring_done
	$(BIN)/foresight-train target=predictor
	$(BIN)/foresight-train target=decoder
	$(BIN)/foresight-train target=vla
	$(MAKE) evaluate

# What the trained world model and goal model show on the held-out episodes.
evaluate: install
	$(BIN)/foresight-evaluate hydra.run.dir=outputs/evaluate/default

clean:
	rm -rf $(VENV) outputs
