# Two commands: `make serve` starts the daemon with the embedded default model,
# `make test` runs the whole test suite. Both create or update .venv/ themselves, with the
# dependency versions of constraints.txt (the ones the suite last passed with).
#
# torch: without CUDA the CPU build is installed. For a CUDA build, pass the PyTorch wheel
# index of your CUDA version, e.g. `make serve TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128`.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.ocs-installed

ifneq ($(TORCH_INDEX_URL),)
TORCH_PIP_ARGS := --index-url $(TORCH_INDEX_URL)
endif

.PHONY: serve test lint venv clean-venv chromium

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	OCS_MODELS=$${OCS_MODELS:-$(CURDIR)/models} OCS_ADAPTERS=$${OCS_ADAPTERS:-$(CURDIR)/adapters} \
		$(BIN)/ollama-compact serve

# The web page's tests drive Debian's chromium (tests/ui_support.py; OCS_TEST_CHROMIUM names
# another build); installed here where it is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v "$$OCS_TEST_CHROMIUM" >/dev/null 2>&1 || { \
		echo "== installing Debian's chromium for the web page's tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q chromium >/dev/null || { \
			$$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

test: $(STAMP) chromium
	$(BIN)/ruff check ollama_compact_server tests
	$(BIN)/ruff format --check ollama_compact_server tests
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@echo "== the suite again under python -O (no check may rely on assert)"
	$(BIN)/python -O -m pytest -q --ignore=tests/test_docker_smoke.py $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
