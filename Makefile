# The two set-up commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test

# Prefer this machine's CPU wheel of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0" || $(PIP) install "torch>=2.4"
	$(PIP) install -q -e ".[test,demo]"

demo: install
	$(PYTHON) -m qwenvl.cli demo --out demo_out

test: install
	$(PYTHON) -m pytest -q
