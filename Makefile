# owl-lab: two commands.
#   make lab   set-up, then JupyterLab on notebooks/ with the shipped tiny checkpoints
#   make test  set-up, then the whole suite (ruff lint + format check, pytest on tests/, notebooks under nbval)
#
# Set-up creates .venv if missing. On a fresh CPU machine it installs the CPU build of torch
# (2.13.0) first; a torch already present in .venv (for example a CUDA build you installed
# yourself) is never replaced, because every other requirement accepts a range it satisfies.
# Every other package is installed at the version locked in constraints.txt, so a new upstream release
# cannot change the shipped numbers or break CI between two runs. A second run is a no-op: the stamp
# file is newer than pyproject.toml and constraints.txt.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.owl-lab-installed
CPU_TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: lab test lint setup test-fast notebooks clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null \
	  && echo "owl-lab: keeping the torch already in $(VENV): $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PY) -m pip install --disable-pip-version-check -q "$(CPU_TORCH)"
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

test: setup lint
	$(PY) -m pytest tests $(PYTEST_ARGS)
	$(PY) -m pytest --nbval --nbval-current-env notebooks --nbval-sanitize-with notebooks/sanitize.cfg $(PYTEST_ARGS)

# Lint and format check (ruff, configured in pyproject.toml): part of `make test`, so CI runs it.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Helpers for development (not part of the two-command contract).
test-fast: setup
	$(PY) -m pytest tests -m "not slow" -x -q

clean-venv:
	rm -rf $(VENV)
