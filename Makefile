# fourm-eval: `make demo` (setup + main job on built-in data), `make test` (setup + tests).
# Both are idempotent: setup runs again only when its inputs change.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# A prebuilt mmcv wheel for the tested stack, where the project's shared folder beside the checkout
# has one (the setup checks it loads its ops, and builds mmcv from source when there is none).
FOURM_EVAL_WHEELHOUSE ?= $(wildcard $(CURDIR)/../shared/wheels)
export FOURM_EVAL_WHEELHOUSE

.PHONY: setup demo test ci-gate bench clean-venv

setup: $(STAMP)

$(STAMP): scripts/setup.sh requirements/stack.txt pyproject.toml
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

# the main job: COCO detection + instance segmentation, smoke profile (built-in mini COCO, tiny 4M, CPU, ~4 min)
demo: setup
	@$(VENV)/bin/fourm-eval run coco-det --profile smoke --work-dir runs/demo/coco-det-smoke
	@$(VENV)/bin/fourm-eval report runs/demo/coco-det-smoke --out runs/demo/report

test: setup
	$(PY) -m pytest -q tests
	$(MAKE) ci-gate

# CI regression gate: the smoke profile of every task, two seeds, compared with reports/ci/expected.json
CI_RUNS := runs/ci
ci-gate: setup
	rm -rf $(CI_RUNS)
	tasks=$$($(VENV)/bin/fourm-eval tasks --names) || exit 1; \
	for task in $$tasks; do \
	  for seed in 0 1; do \
	    $(VENV)/bin/fourm-eval run $$task --profile smoke --seed $$seed --work-dir $(CI_RUNS)/$$task-smoke-seed$$seed || exit 1; \
	  done; \
	done
	$(VENV)/bin/fourm-eval regress $(CI_RUNS) --expected reports/ci/expected.json
	$(VENV)/bin/fourm-eval report $(CI_RUNS) --out $(CI_RUNS)/report

bench: setup
	$(PY) benchmarks/backbone_speed.py

clean-venv:
	rm -rf $(VENV)
