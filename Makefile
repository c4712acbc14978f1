# matryoshka-kv: two-command setup.  `make demo` installs .venv (scripts/install.sh,
# idempotent: seconds when up to date) and runs the demo; `make test` is the CI command.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: all install demo recipe test lint bench clean

all: demo

install:
	scripts/install.sh

# The main job on the embedded default: PCA-calibrate SmolLM2-135M, Matryoshka-train its
# projections through llamafactory-cli, then compare both across KV budgets on held-out text.
# Finished steps are reused on a second run (delete outputs/demo to start over).
DEMO := outputs/demo
demo: install data/sotu_train.jsonl $(DEMO)/matryoshka/config.json
	$(VENV)/bin/mkv eval --model $(DEMO)/pca --model $(DEMO)/matryoshka --label pca --label matryoshka \
		--tokens 8192 --out $(DEMO)/eval

$(DEMO)/pca/config.json: | install
	$(VENV)/bin/mkv calibrate --out $(DEMO)/pca --tokens 16384

$(DEMO)/matryoshka/config.json: $(DEMO)/pca/config.json | data/sotu_train.jsonl
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/llamafactory-cli train scripts/matryoshka_pt.yaml \
		model_name_or_path=$(DEMO)/pca output_dir=$(DEMO)/matryoshka.tmp
	rm -rf $(DEMO)/matryoshka && mv $(DEMO)/matryoshka.tmp $(DEMO)/matryoshka

# The training recipe (scripts/matryoshka_recipe.yaml; measured: 66 min of training on 2 CPU cores,
# about 80 min with data, calibration and evaluation): resumable,
# run it again after an interruption and it continues from its last checkpoint.  Then the small
# projections artifact and the held-out comparison with PCA.
# `make recipe RECIPE_STEPS=240` after it continues the same run to 240 steps (a second cosine from half
# the peak rate, about 60 min more: how the shipped projections were made).
RECIPE := outputs/recipe
RECIPE_STEPS ?= 120
recipe: install data/sotu_train.jsonl data/self_chat_train.jsonl $(DEMO)/pca/config.json
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/llamafactory-cli train scripts/matryoshka_recipe.yaml \
		model_name_or_path=$(DEMO)/pca output_dir=$(RECIPE)/train max_steps=$(RECIPE_STEPS)
	$(VENV)/bin/mkv export-projections --model $(RECIPE)/train --out $(RECIPE)/projections --base-model embedded --overwrite
	$(VENV)/bin/mkv eval --model $(DEMO)/pca --model $(RECIPE)/projections --label pca --label recipe \
		--tokens 8192 --out $(RECIPE)/eval

# The base model's own chat answers to the training instructions (about 6 min; not committed).
data/self_chat_train.jsonl: | install
	$(PY) -m llamafactory_ext.prepare_data --chat

# The training split of the embedded corpus as a LLaMA-Factory dataset (generated, not committed).
data/sotu_train.jsonl: | install
	$(PY) -m llamafactory_ext.prepare_data

test: install data/sotu_train.jsonl
	$(PY) -m pytest -q --durations=30 tests

lint: install
	$(VENV)/bin/ruff check .

# training_cost needs $(DEMO)/pca; quality and accuracy also need $(DEMO)/matryoshka (built as in `make demo`).
bench: install data/sotu_train.jsonl $(DEMO)/pca/config.json $(DEMO)/matryoshka/config.json
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache outputs
