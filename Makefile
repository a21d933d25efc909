# Two entry points: `make demo` and `make test`. Each creates or updates .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
# torch is installed first, pinned. On our machines pip finds the local CPU wheel; elsewhere pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid pulling a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: demo test venv lint clean bench

venv: $(STAMP)

# Reinstall when the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet "pip>=24"
	# torch first and pinned: on our machines this takes the local CPU wheel, never a CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip install --quiet "pytest>=8" "pytest-timeout>=2.3" "ruff>=0.6" "moto[server]>=5" "gcp-storage-emulator>=2024"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --printshellcmds

test: $(STAMP)
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check tokenunify tests benchmarks
	$(BIN)/snakemake --lint

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf results logs .snakemake
