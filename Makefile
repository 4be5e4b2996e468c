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

setup:  ## create both environments from the lock files (cached), and system packages (iproute2, chromium)
	scripts/setup_system.sh
	scripts/setup_env.sh platform >/dev/null
	scripts/setup_env.sh encrypted >/dev/null

run: setup  ## the main job: the pipeline on the default data (Adult)
	./privtrain run --workdir $(WORKDIR)

test: setup  ## the default test suite (both environments)
	scripts/run_tests.sh

test-slow: setup  ## long tests: full-data runs and other slow checks
	scripts/run_tests.sh -m slow

bench: setup  ## benchmarks, each comparison measured side by side in one run; results under bench-results/
	mkdir -p bench-results
	$(PLATFORM_PY) simulations/bench_pipeline.py --output bench-results
	$(PLATFORM_PY) simulations/bench_rerun.py --json bench-results/rerun.json
	nice -n 10 $(PLATFORM_PY) simulations/bench_beam.py --output bench-results
	$(PLATFORM_PY) simulations/bench_dp.py speed --epochs 21 --parts | tee bench-results/dp-speed.txt
	$(PLATFORM_PY) simulations/bench_dp.py utility --eps 1 --seeds 0 1 2 --clip 1 --batch 2048 --epochs 20 --lr 1 \
	  --hidden 32 --json bench-results/dp-utility-eps1.json | tee bench-results/dp-utility-eps1.txt
	$(PLATFORM_PY) simulations/bench_dp.py utility --eps 3 --seeds 0 1 2 --clip 0.5 --batch 2048 --epochs 40 --lr 1 \
	  --json bench-results/dp-utility-eps3.json | tee bench-results/dp-utility-eps3.txt
	$(PLATFORM_PY) simulations/bench_dp.py audit --eps 1 3 --canaries 1000 --json bench-results/dp-audit.json
	$(PLATFORM_PY) simulations/bench_federated.py --accuracy-rounds 30 --stock --json bench-results/federated.json
	$(PLATFORM_PY) simulations/bench_conv_clipping.py --batches 256 2048 --ablation \
	  --json bench-results/conv-clipping.json | tee bench-results/conv-clipping.txt
	$(PLATFORM_PY) simulations/bench_federated_scale.py --json bench-results/federated-scale.json
	$(PLATFORM_PY) simulations/bench_secagg.py --rounds 4 --accuracy-rounds 20 --seeds 0 1 2 --eps 3 \
	  --json bench-results/secagg.json | tee bench-results/secagg.txt
	$(PLATFORM_PY) simulations/bench_serving.py --json bench-results/serving.json
	$(PLATFORM_PY) simulations/bench_encrypted.py --json bench-results/encrypted.json
	nice -n 10 $(PLATFORM_PY) simulations/bench_study.py --output bench-results --epsilons 0.5,1,2,4,8 --seeds 3 \
	  | tee bench-results/study.txt
	$(PLATFORM_PY) simulations/bench_images.py speed --model scatternet_linear --epochs 2 \
	  --json bench-results/images-speed.json | tee bench-results/images-speed.txt
	$(PLATFORM_PY) simulations/bench_images.py utility --models scatternet_linear --eps 1 2 3 --seeds 0 1 2 \
	  --json bench-results/images-linear.json | tee bench-results/images-linear.txt
	$(PLATFORM_PY) simulations/bench_images.py utility --models scatternet_cnn cnn --eps 3 --seeds 0 \
	  --json bench-results/images-cnn.json | tee bench-results/images-cnn.txt
	$(PLATFORM_PY) simulations/bench_images.py pipeline --json bench-results/images-pipeline.json

clean:
	rm -rf $(WORKDIR) bench-results
