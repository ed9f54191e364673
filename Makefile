# Two entry points: `make demo` (the whole pipeline on scikit-learn's digits) and
# `make test`. Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The torch build to install when the venv has none. Override to get another build,
# e.g. `make TORCH=torch` or `make TORCH="torch --index-url <your index>"`.
TORCH  ?= torch==2.13.0
STAMP   = $(VENV)/.dtrak-installed

.PHONY: install demo test test-all lint bench bench-cifar2 bench-text2image clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,clip,lora,ray,influence]"
# kronfluence (kfac-if / ekfac-if) goes in without its declared dependencies: it asks for
# torchvision, whose PyPI wheel would replace the CPU torch installed above
	$(BIN)/pip install -q --no-deps kronfluence==1.0.1 einconv
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dtrak demo --out demo-run

# The CIFAR-2 reproduction (benchmarks/RESULTS.md): about 2 hours on 2 cores, resumable.
DATA ?= ../shared/data/cifar10
bench-cifar2: $(STAMP)
	$(BIN)/dtrak run configs/cifar2-bench.toml --out bench-runs/cifar2 --set data.root=$(DATA)
	$(BIN)/python benchmarks/cifar2_tables.py bench-runs/cifar2 > bench-runs/cifar2/tables.md
	@echo "tables: bench-runs/cifar2/tables.md"

# The text-to-image benchmark (benchmarks/RESULTS.md): a small text-conditioned base on eight
# CIFAR-10 classes, then LoRA fine-tunes of it on CIFAR-2, attributed by LoRA gradients.
bench-text2image: $(STAMP)
	test -f bench-runs/text-base/model_index.json || $(BIN)/dtrak text-base bench-runs/text-base
	$(BIN)/dtrak run configs/cifar8-text-base.toml --out bench-runs/cifar8-text-base \
	  --set data.root=$(DATA) --set model.pretrained=bench-runs/text-base
	$(BIN)/dtrak run configs/cifar2-lora-bench.toml --out bench-runs/cifar2-lora \
	  --set data.root=$(DATA) --set model.pretrained=bench-runs/cifar8-text-base/model/unet
	cd benchmarks && ../$(BIN)/python text2image_tables.py ../bench-runs/cifar2-lora \
	  ../bench-runs/cifar8-text-base > ../bench-runs/cifar2-lora/tables.md
	@echo "tables: bench-runs/cifar2-lora/tables.md"

# The report test renders pages in headless Chromium (Debian's package); install it when
# missing and we may (root with apt), otherwise that test skips with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: chromium not installed; the browser test will be skipped"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf demo-run .pytest_cache
