# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Where the CPU build of torch comes from when the local package index does not carry it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-all lint install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch with CUDA from the package index"; \
		$(BIN)/python -m pip install -q "torch>=2.4"; \
	else \
		echo "No GPU found: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(BIN)/python -m pip install -q --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/freemerge demo --config configs/free.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q --durations=25

test-all: lint
	$(BIN)/pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
