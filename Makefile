# fourm-eval: `make demo` (setup + main job on built-in data), `make test` (setup + tests).
# Both are idempotent: setup runs again only when its inputs change.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

$(STAMP): scripts/setup.sh requirements/stack.txt pyproject.toml
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/fourm-eval inspect tests/data/fm_tiny_swiglu.safetensors
	$(VENV)/bin/fourm-eval forward --checkpoint tests/data/fm_tiny_swiglu.safetensors --layers 0,1

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/backbone_speed.py

clean-venv:
	rm -rf $(VENV)
