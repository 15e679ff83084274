# The README's two commands: `make demo` and `make test`. Each creates the
# virtualenv when it is missing. torch is installed first and pinned: a CPU build
# of 2.13.0 is on disk, and any unpinned torch pulls gigabytes of CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint setup browser

$(BIN)/tessera: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[pipeline,test]'
	touch $(BIN)/tessera

setup: $(BIN)/tessera

demo: setup
	$(BIN)/tessera run --dry-run

lint: setup
	$(BIN)/ruff check .

# The run-report test renders report.html in Debian's headless Chromium.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: lint browser
	$(BIN)/python -m pytest -q
