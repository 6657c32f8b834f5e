# bnlab: `make demo` (set up, then the main job) and `make test` (set up, then lint + tests).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    := /usr/share/datasets/fashion-mnist
STAMP   := $(VENV)/.bnlab-installed

.PHONY: setup data demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: a bare `torch` would pull several GB of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[lab,test]'
	touch $(STAMP)

setup: $(STAMP)

data:
	@if [ -f $(DATA)/train-images-idx3-ubyte.gz ] || [ -f $(DATA)/train-images-idx3-ubyte ]; then \
	  echo "Fashion-MNIST found in $(DATA)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  { echo "error: could not install dataset-fashion-mnist with apt-get"; exit 1; }; \
	else \
	  echo "error: Fashion-MNIST is missing from $(DATA)."; \
	  echo "Install it as root: apt-get update && apt-get install -y dataset-fashion-mnist"; \
	  echo "or pass any MNIST-format directory with --data-dir."; exit 1; \
	fi

# The main job: Figure 1 of Ioffe & Szegedy 2015 at the paper's settings, then the report.
# THREADS=1 (default): the MLP gains nothing from a second thread, and on a machine shared
# with other jobs torch's thread barriers make 2 threads several times slower. THREADS=2 overrides.
THREADS ?= 1
demo: setup data
	$(BIN)/python -m bnlab.demo
	$(BIN)/bnlab run ioffe2015.fig1 --preset paper --resume $(if $(THREADS),--threads $(THREADS))
	$(BIN)/bnlab report

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
