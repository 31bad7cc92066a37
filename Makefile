# Two commands matter: `make run` (service + simulated GPUs) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
GPUS ?= 2
SIM_PORT ?= 8188
PORT ?= 8000

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Ctrl-C reaches both processes (same process group); the trap stops the
# simulator if the service exits on its own.
run: $(STAMP)
	@echo "Simulated ComfyUI: $(GPUS) GPU(s) from port $(SIM_PORT); Cylindria: http://127.0.0.1:$(PORT)/"
	@trap 'kill 0 2>/dev/null' EXIT; \
	$(BIN)/cylindria simulate --gpus $(GPUS) --base-port $(SIM_PORT) & \
	CYLINDRIA_CALLBACK_ALLOW=127.0.0.0/8,::1 COMFYUI_BASE_URL=http://127.0.0.1:$(SIM_PORT) $(BIN)/cylindria serve \
	    --port $(PORT) --numberOfGpus $(GPUS)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# bench/store.py measures requests per second with wrk when it is installed
# (Debian: apt-get install wrk); without it those rows are skipped.
bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/store.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
