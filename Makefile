# matryoshka-kv: two-command setup.  `make demo` installs .venv (scripts/install.sh,
# idempotent: seconds when up to date) and runs the demo; `make test` is the CI command.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: all install demo recipe longctx test lint bench clean

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

# The long-context recipe (scripts/matryoshka_longctx.yaml): pre-RoPE PCA over windows of 512, 2,048 and
# 8,192 tokens, then Matryoshka distillation on packed 2,048-token windows, resumable (run it again after an
# interruption; `make longctx LONGCTX_STEPS=60` continues the same run further), then the projections artifact
# and the long-context comparison with the shipped projections (the last 512 tokens after 2k / 4k / 8k).
LONGCTX := outputs/longctx
LONGCTX_STEPS ?= 30
$(LONGCTX)/pca-pre-rope/config.json: | install
	$(VENV)/bin/mkv calibrate --out $(LONGCTX)/pca-pre-rope --seq-len 512,2048,8192 --tokens 49152 \
		--key-space pre-rope --batch-size 1

longctx: install data/sotu_train.jsonl $(LONGCTX)/pca-pre-rope/config.json
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/llamafactory-cli train scripts/matryoshka_longctx.yaml \
		max_steps=$(LONGCTX_STEPS)
	$(VENV)/bin/mkv export-projections --model $(LONGCTX)/train --out $(LONGCTX)/projections --base-model embedded \
		--overwrite
	$(VENV)/bin/mkv eval --model embedded-matryoshka --model $(LONGCTX)/projections --label shipped-512 \
		--label longctx --budgets 1,0.5,0.25 --context 2048,4096,8192 --out $(LONGCTX)/eval

# The base model's own chat answers to the training instructions (about 6 min; not committed).
data/self_chat_train.jsonl: | install
	$(PY) -m llamafactory_ext.prepare_data --chat

# The training split of the embedded corpus as a LLaMA-Factory dataset (generated, not committed).
data/sotu_train.jsonl: | install
	$(PY) -m llamafactory_ext.prepare_data

# Two workers, each running whole test files (module fixtures are built once), one torch thread each.
test: install data/sotu_train.jsonl
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=60 tests

lint: install
	$(VENV)/bin/ruff check .

# training_cost needs $(DEMO)/pca; quality and accuracy also need $(DEMO)/matryoshka (built as in `make demo`).
bench: install data/sotu_train.jsonl $(DEMO)/pca/config.json $(DEMO)/matryoshka/config.json
	$(PY) -m benchmarks.run_all

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache outputs
