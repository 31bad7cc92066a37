# Two commands matter: `make run` (service + simulated GPUs) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
GPUS ?= 2
SIM_PORT ?= 18188
PORT ?= 8000

.PHONY: install run test fuzz lint bench chaos clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The simulated GPUs and the service in one process. SIM_PORT is not ComfyUI's 8188,
# so a real ComfyUI on this machine is never used by mistake; ports in use stop it
# with one line.
run: $(STAMP)
	@$(BIN)/cylindria demo --numberOfGpus $(GPUS) --sim-port $(SIM_PORT) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest

# The long runs of the fuzz test and of the contract test (a few minutes), each in a
# process of its own: after the fuzz test's 5,000 examples, the contract test runs many
# times slower in the same process.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_fuzz.py
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_contract.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# bench/store.py measures requests per second with wrk when it is installed
# (Debian: apt-get install wrk); without it those rows are skipped.
bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/inputs.py

# Thousands of jobs through real processes under faults, checked against what ran.
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py --jobs $(or $(JOBS),10000) --retry-lost $(or $(RETRY_LOST),0)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
