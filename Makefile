# Two commands on a fresh machine: `make demo` (set-up + the main jobs end to end) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
UI_VENV ?= .venv-ui
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RAY := $(VENV)/bin/ray
DASHBOARD := http://127.0.0.1:8265
# Job output without two Ray 2.60 lines that mean nothing here (the job's log in the dashboard keeps them):
# core_worker.cc's "constructor arguments in the object store" error, logged wherever a Ray Data actor pool starts,
# since Ray Data hands restartable actors its own ray.put() arguments (ray-project/ray#57733); and Ray Data's
# "Progress bars disabled" notice from each process that runs a training dataset (off there on purpose: the training
# loop reports progress). PYTHONUNBUFFERED: through a pipe the CLI would print in 8 KB bursts.
SUBMIT := set -o pipefail; PYTHONUNBUFFERED=1 $(RAY) job submit
QUIET := grep --line-buffered -v -F -e 'has constructor arguments in the object store' -e 'Progress bars disabled. To enable'

# Everything the demo writes (tiny model, data, runs, adapters) lives under AIGD_HOME.
export AIGD_HOME ?= $(CURDIR)/.aigd
# Ray session files need short socket paths, and are never cleaned by Ray itself.
export RAY_TMPDIR ?= /tmp/aigd-ray
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# Local clusters on loopback only; use RAY_AUTH_MODE=token for anything shared.
export RAY_AUTH_MODE ?= disabled
export RAY_DEDUP_LOGS := 0
# Ray Train's preemption watcher follows nodes being drained; this cluster is one node, and creating the watcher logs
# core_worker.cc's "constructor arguments in the object store" error (a false alarm for its actor-handle arguments).
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# `ray start` hands its PATH to job drivers: their `python` must be this venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo demo-data tiny-model cluster train-demo score-demo eval-demo serve-demo lifecycle-demo ui experiment generalization test test-fast stop clean

setup: $(VENV)/.installed $(UI_VENV)/.installed

# torch/torchvision first, pinned to the release on the build machines' disk (a CUDA build that
# runs on CPU); then the project with its dev extra.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	touch $@

# The web page's own environment: Gradio and requests, this package without its dependencies.
$(UI_VENV)/.installed: pyproject.toml
	python3 -m venv $(UI_VENV)
	$(UI_VENV)/bin/pip install -q --upgrade pip
	$(UI_VENV)/bin/pip install -q "gradio>=6,<7" "requests>=2.31"
	@# Gradio 6 caps Pillow below 13; the page decodes untrusted uploads (the Stability tab's copies), so it gets
	@# the release with the JPEG and EXIF fixes the API requires (tests/test_web.py drives the page on it).
	$(UI_VENV)/bin/pip install -q --no-deps "pillow>=13,<14"
	$(UI_VENV)/bin/pip install -q --no-deps -e .
	touch $@

tiny-model: setup
	$(VENV)/bin/aigd tiny-model --out $(AIGD_HOME)/tiny-qwen2.5-vl

demo-data: setup
	$(VENV)/bin/aigd demo-data --config configs/demo_data.yaml

cluster: setup
	@mkdir -p $(RAY_TMPDIR)
	@curl -sf $(DASHBOARD)/api/version >/dev/null || $(RAY) start --head --num-cpus=2 --dashboard-host=127.0.0.1 \
		--include-dashboard=true --disable-usage-stats --metrics-export-port=8080
	@echo "Ray dashboard: $(DASHBOARD)"

train-demo: cluster tiny-model demo-data
	$(SUBMIT) --address $(DASHBOARD) --working-dir . \
		--runtime-env-json '{"env_vars": {"AIGD_HOME": "$(AIGD_HOME)", "HF_HUB_OFFLINE": "1"}}' \
		-- python jobs/train_method1.py --config configs/demo_method1.yaml | $(QUIET)
	$(SUBMIT) --address $(DASHBOARD) --working-dir . \
		--runtime-env-json '{"env_vars": {"AIGD_HOME": "$(AIGD_HOME)", "HF_HUB_OFFLINE": "1"}}' \
		-- python jobs/train_method2.py --config configs/demo_method2.yaml | $(QUIET)

score-demo: setup
	@for method in method1 method2; do \
		echo "== $$method adapter on held-out-style samples (file name says the truth) =="; \
		$(VENV)/bin/aigd score --adapter $(AIGD_HOME)/adapters/$$method $(AIGD_HOME)/demo-data/samples/*; \
	done
	@echo "Ray dashboard (jobs, Train runs, metrics): $(DASHBOARD)   -- stop the cluster with: make stop"

# Both adapters and their ensemble on the demo test split: robustness sweep, calibration, report.
eval-demo: cluster
	$(SUBMIT) --address $(DASHBOARD) --working-dir . \
		--runtime-env-json '{"env_vars": {"AIGD_HOME": "$(AIGD_HOME)", "HF_HUB_OFFLINE": "1"}}' \
		-- python jobs/evaluate.py --config configs/eval_demo.yaml | $(QUIET)
	@echo "Evaluation report: $(AIGD_HOME)/eval/report.html"

# The detector app on the demo cluster: both adapters on one base, router on http://127.0.0.1:8000.
serve-demo: cluster
	@# a redeploy of an unchanged config keeps the old code: start from no app
	-@$(VENV)/bin/serve shutdown -y --address $(DASHBOARD) >/dev/null 2>&1
	$(VENV)/bin/serve run --non-blocking --address auto --working-dir . configs/serve_demo.yaml
	@for i in $$(seq 120); do curl -sf http://127.0.0.1:8000/readyz >/dev/null && break; sleep 1; done
	@curl -sf http://127.0.0.1:8000/readyz >/dev/null || (echo "the app did not become ready; see the Serve tab of $(DASHBOARD)"; exit 1)
	@sample=$$(ls $(AIGD_HOME)/demo-data/samples/fake-* | head -1); \
	echo "Detector app ready (API docs: http://127.0.0.1:8000/docs). One answer in full:"; \
	echo "  curl -s -F image=@$$sample http://127.0.0.1:8000/v1/ensemble"; \
	curl -s -F image=@$$sample http://127.0.0.1:8000/v1/ensemble | $(PY) -m json.tool; \
	echo "Held-out samples of each class (test split, never trained on):"; \
	$(PY) serve/try_samples.py --url http://127.0.0.1:8000 $(AIGD_HOME)/demo-data/samples/*
	@sample=$$(ls $(AIGD_HOME)/demo-data/samples/fake-* | head -1); \
	echo "Where the evidence is, for that held-out fake (the ensemble's occlusion map through /v1/explain):"; \
	$(VENV)/bin/aigd explain --api http://127.0.0.1:8000 $$sample --out $(AIGD_HOME)/explain-overlay.png
	@echo "Adapter versions in the registry, their recorded figures, and which one the app serves:"
	@$(VENV)/bin/aigd adapters list --app http://127.0.0.1:8000

# The adapter lifecycle on the running demo app (after `make demo`): a calibrated new version of each
# adapter (jobs/evaluate.py calibrate=true, evaluated on the same test split), then method2's through
# the gate into the app in place, the answers naming it, and a rollback.
APP := http://127.0.0.1:8000
lifecycle-demo: cluster
	$(SUBMIT) --address $(DASHBOARD) --working-dir . \
		--runtime-env-json '{"env_vars": {"AIGD_HOME": "$(AIGD_HOME)", "HF_HUB_OFFLINE": "1"}}' \
		-- python jobs/evaluate.py --config configs/eval_demo.yaml calibrate=true out_dir=$(AIGD_HOME)/eval-calibrated | $(QUIET)
	$(VENV)/bin/aigd adapters list --app $(APP)
	$(VENV)/bin/aigd promote method2 $$(ls $(AIGD_HOME)/adapters/method2 | grep -E '^[0-9]{8}T' | tail -1) \
		--app $(APP) --config configs/promote_demo.yaml
	@sample=$$(ls $(AIGD_HOME)/demo-data/samples/fake-* | head -1); \
	echo "an answer now names the promoted version:"; \
	curl -s -F image=@$$sample "$(APP)/v1/detect?adapter=method2" | $(PY) -c "import json,sys; print(json.load(sys.stdin)['model'])"
	$(VENV)/bin/aigd rollback method2 --app $(APP) --config configs/promote_demo.yaml
	$(VENV)/bin/aigd adapters list --app $(APP)

# The proxy table in docs/benchmarks.md: both methods x 3 seeds, trained, evaluated, summarised, on its own local
# Ray (the demo cluster is stopped first: its Serve app would hold CPUs the jobs need).
experiment: stop tiny-model demo-data
	$(PY) bench/experiment.py --seeds 0 1 2 --doc docs/benchmarks.md --json

# Leave-one-generator-out: both methods trained without each zoo family in turn, 2 seeds, evaluated
# per generator; writes the table into docs/generalization.md (its own local Ray, like experiment).
# 6 epochs instead of the demo's 10 (3 left Method 2 near chance): one seed takes ~40 min on 2 CPUs.
generalization: stop tiny-model demo-data
	$(PY) bench/generalization.py --seeds 0 1 --epochs 6 --doc docs/generalization.md

demo: train-demo eval-demo serve-demo
	@echo "Evaluation report: $(AIGD_HOME)/eval/report.html   Dashboard: $(DASHBOARD)   Stop: make stop"
	@echo "Web page: make ui  ->  http://127.0.0.1:7860   API docs: http://127.0.0.1:8000/docs"

# The web page (a client of the API on :8000), on http://127.0.0.1:7860; Ctrl-C stops it.
ui: setup
	GRADIO_ANALYTICS_ENABLED=False $(UI_VENV)/bin/python -m aigd.ui --api http://127.0.0.1:8000 --port 7860 \
		--examples $(AIGD_HOME)/demo-data/samples

test: setup
	$(PY) -m pytest -x -q --durations=30

# The edit loop: everything that needs no Ray cluster (under a minute).
test-fast: setup
	$(PY) -m pytest -x -q -m "not slow"

stop:
	-$(RAY) stop --force

clean: stop
	rm -rf $(AIGD_HOME) $(RAY_TMPDIR)
