# Two commands on a fresh machine: `make demo` (set-up + the main jobs end to end) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RAY := $(VENV)/bin/ray
DASHBOARD := http://127.0.0.1:8265

# Everything the demo writes (tiny model, data, runs, adapters) lives under AIGD_HOME.
export AIGD_HOME ?= $(CURDIR)/.aigd
# Ray session files need short socket paths, and are never cleaned by Ray itself.
export RAY_TMPDIR ?= /tmp/aigd-ray
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# Local clusters on loopback only; use RAY_AUTH_MODE=token for anything shared.
export RAY_AUTH_MODE ?= disabled
export RAY_DEDUP_LOGS := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# `ray start` hands its PATH to job drivers: their `python` must be this venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo demo-data tiny-model cluster train-demo score-demo test stop clean

setup: $(VENV)/.installed

# torch/torchvision first, pinned to the release on the build machines' disk (a CUDA build that
# runs on CPU); then the project with its dev extra.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	touch $@

tiny-model: setup
	$(VENV)/bin/aigd tiny-model --out $(AIGD_HOME)/tiny-qwen2.5-vl

demo-data: setup
	$(VENV)/bin/aigd demo-data --config configs/demo_data.yaml

cluster: setup
	@mkdir -p $(RAY_TMPDIR)
	@$(RAY) status >/dev/null 2>&1 || $(RAY) start --head --num-cpus=2 --dashboard-host=127.0.0.1 \
		--include-dashboard=true --disable-usage-stats
	@echo "Ray dashboard: $(DASHBOARD)"

train-demo: cluster tiny-model demo-data
	$(RAY) job submit --address $(DASHBOARD) --working-dir . \
		--runtime-env-json '{"env_vars": {"AIGD_HOME": "$(AIGD_HOME)", "HF_HUB_OFFLINE": "1"}}' \
		-- python jobs/train_method1.py --config configs/demo_method1.yaml
	$(RAY) job submit --address $(DASHBOARD) --working-dir . \
		--runtime-env-json '{"env_vars": {"AIGD_HOME": "$(AIGD_HOME)", "HF_HUB_OFFLINE": "1"}}' \
		-- python jobs/train_method2.py --config configs/demo_method2.yaml

score-demo: setup
	@for method in method1 method2; do \
		echo "== $$method adapter on held-out-style samples (file name says the truth) =="; \
		$(VENV)/bin/aigd score --model $(AIGD_HOME)/tiny-qwen2.5-vl --adapter $(AIGD_HOME)/adapters/$$method \
			--image max_pixels=19600 $(AIGD_HOME)/demo-data/samples/*; \
	done
	@echo "Ray dashboard (jobs, Train runs, metrics): $(DASHBOARD)   -- stop the cluster with: make stop"

demo: train-demo score-demo

test: setup
	$(PY) -m pytest -x -q

stop:
	-$(RAY) stop --force

clean: stop
	rm -rf $(AIGD_HOME) $(RAY_TMPDIR)
