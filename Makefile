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

# CI regression gate alone: the smoke profile of every registered task, seeds 0 and 1, compared with
# reports/ci/expected.json (tests/test_ci_gate.py; `make test` includes it)
ci-gate: setup
	$(PY) -m pytest -q -s tests/test_ci_gate.py

bench: setup
	$(PY) benchmarks/backbone_speed.py

clean-venv:
	rm -rf $(VENV)
