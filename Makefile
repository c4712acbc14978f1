# matryoshka-kv: two-command setup.  `make demo` installs .venv (scripts/install.sh,
# idempotent: seconds when up to date) and runs the demo; `make test` is the CI command.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: all install demo test lint bench clean

all: demo

install:
	scripts/install.sh

demo: install data/sotu_train.jsonl
	$(VENV)/bin/mkv demo

# The training split of the embedded corpus as a LLaMA-Factory dataset (generated, not committed).
data/sotu_train.jsonl: | install
	$(PY) -m llamafactory_ext.prepare_data

test: install data/sotu_train.jsonl
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache outputs
