# privtrain: every target sets up what it needs (environments are cached under ~/.cache/privtrain/envs).
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -euo pipefail -c
PLATFORM_PY = $$(scripts/setup_env.sh platform)/bin/python
ENCRYPTED_PY = $$(scripts/setup_env.sh encrypted)/bin/python
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL := 3
WORKDIR ?= privtrain-work

.PHONY: setup run test test-slow bench clean

setup:  ## create both environments from the lock files (cached)
	scripts/setup_env.sh platform >/dev/null
	scripts/setup_env.sh encrypted >/dev/null

run: setup  ## the main job: the pipeline on the default data (Adult)
	./privtrain run --workdir $(WORKDIR)

test: setup  ## the default test suite (both environments)
	scripts/run_tests.sh

test-slow: setup  ## long tests: full-data runs and other slow checks
	scripts/run_tests.sh -m slow

bench: setup  ## benchmarks; results under bench-results/
	mkdir -p bench-results
	for script in simulations/bench_*.py; do
	  echo "== $$script"
	  $(PLATFORM_PY) $$script --output bench-results
	done

clean:
	rm -rf $(WORKDIR) bench-results
