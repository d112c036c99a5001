# resflax: every target creates/uses .venv (target `venv`, idempotent).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=
SCHEDULE_SCALE ?= 1.0
# Where datasets are read and prepared: DATA_DIR=DIR (a TFDS data_dir) is the only place looked at; unset,
# TFDS's own order ($TFDS_DATA_DIR, then ~/tensorflow_datasets). For CIFAR-10 alone, a copy beside this
# checkout (../shared/tfds/cifar10) is used when neither DATA_DIR nor TFDS_DATA_DIR is set: it is read, never
# written (ImageNet is prepared in DATA_DIR or TFDS's default, not there).
DATA_DIR ?=
SHARED_TFDS := $(if $(wildcard ../shared/tfds/cifar10),$(abspath ../shared/tfds))
CIFAR_DATA_DIR := $(or $(DATA_DIR),$(if $(TFDS_DATA_DIR),,$(SHARED_TFDS)))
cifar_data = $(if $(CIFAR_DATA_DIR),--config.data_dir=$(CIFAR_DATA_DIR))
data_flag = $(if $(DATA_DIR),--config.data_dir=$(DATA_DIR))

CIFAR_MODELS := resnet20 resnet32 resnet44 resnet56 resnet110 resnet1202 plain20 plain32 plain44 plain56 plain110

DEGRADATION := plain20 plain32 plain44 plain56 plain110 resnet20 resnet32 resnet44 resnet56 resnet110
TABLE6      := resnet20 resnet32 resnet44 resnet56 resnet1202
STUDY       := plain20 resnet20 plain56 resnet56
# make study runs at schedule_scale 0.01 unless SCHEDULE_SCALE is given on the command line
STUDY_SCHEDULE_SCALE = $(if $(filter command line,$(origin SCHEDULE_SCALE)),$(SCHEDULE_SCALE),0.01)
rundir = runs/cifar-$(1)$(if $(filter-out 1.0,$(SCHEDULE_SCALE)),-s$(SCHEDULE_SCALE))
# ImageNet: Table 2 (plain/ResNet-18/34, option A), Table 3 (VGG-16/19, ResNet-34 B/C, ResNet-50/101/152, option B)
IMAGENET_MODELS := plain18 plain34 resnet18 resnet34 resnet50 resnet101 resnet152 vgg16 vgg19
inrundir = runs/imagenet-$(1)$(if $(filter-out 1.0,$(SCHEDULE_SCALE)),-s$(SCHEDULE_SCALE))

.PHONY: venv venv-newest test test-fast test-newest lint demo data summary bench clean cifar-degradation cifar-table6 study \
	$(addprefix cifar-,$(CIFAR_MODELS)) $(addprefix imagenet-,$(IMAGENET_MODELS)) imagenet-resnet34-B \
	imagenet-resnet34-C imagenet-tiny imagenet-data

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test-torch]'
	touch $(STAMP)

# The newest end of the supported range (the pins in .ci/newest.txt) on Python 3.12: CI's second stage, in a venv
# of its own with the test extra without PyTorch (the tests that need torch skip). The Python: PY_NEWEST, else
# python3.12 on PATH, else pyenv's newest 3.12.x.
VENV_NEWEST  := .venv-newest
NEWEST_STAMP := $(VENV_NEWEST)/.installed
PY_NEWEST    ?=
# Besides the not-slow suite: one kill/resume test, and the notebook's install keeping this venv's JAX
NEWEST_SLOW  := tests/test_robustness.py::test_kill9_anywhere_then_rerun_gives_the_same_digest \
	tests/test_notebook.py::test_installing_resflax_the_notebooks_way_keeps_the_runtimes_jax

venv-newest: $(NEWEST_STAMP)

$(NEWEST_STAMP): setup.cfg pyproject.toml .ci/newest.txt
	@py="$(PY_NEWEST)"; \
	if [ -z "$$py" ]; then \
	  for c in python3.12 $$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r); do \
	    if "$$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then py="$$c"; break; fi; \
	  done; \
	fi; \
	if [ -z "$$py" ] || ! "$$py" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' 2>/dev/null; then \
	  echo "make venv-newest: no Python 3.12 found$${py:+ ($$py is not Python >= 3.12)}: put python3.12 on PATH," \
	    "install it with pyenv, or give PY_NEWEST=/path/to/python3.12 (JAX 0.11 and later need Python >= 3.12)" >&2; \
	  exit 2; \
	fi; \
	echo "$(VENV_NEWEST): $$py ($$("$$py" -V 2>&1))"; \
	test -x $(VENV_NEWEST)/bin/python || "$$py" -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_NEWEST)/bin/python -m pip install -q -c .ci/newest.txt -e '.[test]'
	$(VENV_NEWEST)/bin/python -c "import importlib.metadata as m, sys; print('python', sys.version.split()[0], \
	  *(f'{n} {m.version(n)}' for n in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain')))"
	touch $(NEWEST_STAMP)

# Two worker processes, a test file each at a time (-n 2 --dist loadfile; conftest.py starts the longest files
# first). Much of the suite is single-threaded compilation, so on 2 cores two workers gain: 1,124 s against
# 1,248 s in one process (2026-11-28 code, same machine), 945 s with the -O1 initialisers of 2026-11-29.
# One process: `.venv/bin/python -m pytest -q`.
# The real-CIFAR tests read $$TFDS_DATA_DIR: DATA_DIR's, else the shared copy's when it is not set.
test_env = $(if $(CIFAR_DATA_DIR),TFDS_DATA_DIR=$(CIFAR_DATA_DIR))

test: venv
	$(test_env) $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

test-fast: venv
	$(test_env) $(BIN)/python -m pytest -q -m "not slow"

# CI's second stage: the not-slow suite and NEWEST_SLOW on the newest JAX (venv-newest)
test-newest: venv-newest
	$(test_env) $(VENV_NEWEST)/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow" --durations=10
	$(test_env) $(VENV_NEWEST)/bin/python -m pytest -q $(NEWEST_SLOW)

lint: venv
	$(BIN)/ruff check src tests benchmarks experiments

summary: venv
	$(BIN)/resflax summary

# Finds CIFAR-10 (config data_dir, $$TFDS_DATA_DIR, ~/tensorflow_datasets); prepares it once if missing.
data: venv
	@$(BIN)/resflax prepare-data $(if $(CIFAR_DATA_DIR),--data_dir $(CIFAR_DATA_DIR)) 2>/dev/null || { \
	  echo "CIFAR-10 not found; installing the preparation extra (TensorFlow) and downloading it once"; \
	  $(BIN)/python -m pip install -q -e '.[prepare]' && \
	  $(BIN)/resflax prepare-data $(if $(CIFAR_DATA_DIR),--data_dir $(CIFAR_DATA_DIR)); }

# A CPU-sized run: ResNet-20 on a ~600-step scaled schedule, ends with its test error.
demo: data
	$(BIN)/resflax train --config=experiments/cifar10.py:runlocal $(cifar_data) --workdir=runs/demo $(ARGS)

# The paper's recipe (64k iterations) for each CIFAR-10 model; SCHEDULE_SCALE=0.1 scales every step count.
$(addprefix cifar-,$(CIFAR_MODELS)): cifar-%: data
	$(BIN)/resflax train --config=experiments/cifar10.py:$*,schedule_scale=$(SCHEDULE_SCALE) $(cifar_data) \
	  --workdir=$(call rundir,$*) $(ARGS)

# Fig. 6 (plain vs residual at 20..110 layers) and Table 6 (ResNet-20..1202, ResNet-110 over 5 seeds).
# POPULATION=auto (default): on a GPU/TPU, networks of one depth train together as one population (one program,
# one directory per member under WORKDIR/members/, see README "Populations"): plain-n and ResNet-n of Fig. 6, the
# five ResNet-110 seeds of Table 6; on the CPU, where a population is no faster, one run after the other.
# POPULATION=yes / no forces either. Rerun to resume. SCHEDULE_SCALE=0.1 scales every step count.
POPULATION ?= auto
DEPTHS := 20 32 44 56 110
use_population = $(if $(filter yes,$(POPULATION)),yes,$(if $(filter no,$(POPULATION)),,$(shell \
  $(BIN)/python -c "import jax; print('yes' if jax.default_backend() != 'cpu' else '')" 2>/dev/null)))

comma := ,
DEGRADATION_POP = for d in $(DEPTHS); do $(BIN)/resflax train \
  --config=experiments/cifar10.py:resnet$$d$(comma)schedule_scale=$(SCHEDULE_SCALE) \
  --config.population.residual=0$(comma)1 $(cifar_data) --workdir=$(call rundir,pop$$d) $(ARGS) || exit 1; done
DEGRADATION_SINGLE = for m in $(DEGRADATION); do $(MAKE) --no-print-directory cifar-$$m || exit 1; done
SEEDS110_POP = $(BIN)/resflax train --config=experiments/cifar10.py:resnet110$(comma)schedule_scale=$(SCHEDULE_SCALE) \
  --config.population.seeds=0$(comma)1$(comma)2$(comma)3$(comma)4 $(cifar_data) \
  --workdir=$(call rundir,resnet110-seeds) $(ARGS)
SEEDS110_SINGLE = for s in 0 1 2 3 4; do $(BIN)/resflax train \
  --config=experiments/cifar10.py:resnet110$(comma)seed=$$s$(comma)schedule_scale=$(SCHEDULE_SCALE) $(cifar_data) \
  --workdir=$(call rundir,resnet110-seed$$s) $(ARGS) || exit 1; done

cifar-degradation: data
	$(if $(use_population),$(DEGRADATION_POP),$(DEGRADATION_SINGLE))
	$(BIN)/resflax report $(if $(use_population),$(foreach d,$(DEPTHS),$(call rundir,pop$(d))),$(foreach \
	  m,$(DEGRADATION),$(call rundir,$(m)))) --out $(call rundir,degradation-report)

cifar-table6: data
	for m in $(TABLE6); do $(MAKE) --no-print-directory cifar-$$m || exit 1; done
	$(if $(use_population),$(SEEDS110_POP),$(SEEDS110_SINGLE))
	$(BIN)/resflax report $(foreach m,$(TABLE6),$(call rundir,$(m))) $(if $(use_population),$(call \
	  rundir,resnet110-seeds),$(foreach s,0 1 2 3 4,$(call rundir,resnet110-seed$(s)))) --out $(call rundir,table6-report)

# The short CPU study committed under docs/study: plain/ResNet at 20 and 56 layers, schedule x 0.01
# (0.01: 640 steps, lr 0.1 / 0.01 / 0.001 from steps 0 / 320 / 480; about 40 min on 2 idle cores).
study: data
	for m in $(STUDY); do $(BIN)/resflax train --config=experiments/cifar10.py:$$m,schedule_scale=$(STUDY_SCHEDULE_SCALE) \
	  $(cifar_data) --workdir=runs/study/$$m --config.progress=False --config.eval_every_steps=160 $(ARGS) || exit 1; done
	$(BIN)/resflax report $(addprefix runs/study/,$(STUDY)) --out docs/study
	$(BIN)/resflax responses --workdir $(addprefix runs/study/,$(STUDY)) --out docs/study

# ImageNet (imagenet2012 from TFDS, prepared once from the manual download: `make imagenet-data
# MANUAL_DIR=DIR`, DIR holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar). Runs need a GPU/TPU host.
imagenet-data: venv
	$(BIN)/python -m pip install -q -e '.[prepare]'
	$(BIN)/resflax prepare-data --dataset imagenet2012 $(if $(DATA_DIR),--data_dir $(DATA_DIR)) \
	  $(if $(MANUAL_DIR),--manual_dir $(MANUAL_DIR))

$(addprefix imagenet-,$(IMAGENET_MODELS)): imagenet-%: venv
	$(BIN)/resflax train --config=experiments/imagenet.py:$*,schedule_scale=$(SCHEDULE_SCALE) $(data_flag) \
	  --workdir=$(call inrundir,$*) $(ARGS)

# Table 3's ResNet-34 with projection shortcuts: B (where the shape changes) and C (everywhere)
imagenet-resnet34-B imagenet-resnet34-C: imagenet-resnet34-%: venv
	$(BIN)/resflax train --config=experiments/imagenet.py:resnet34,shortcut=$*,schedule_scale=$(SCHEDULE_SCALE) \
	  $(data_flag) --workdir=$(call inrundir,resnet34-$*) $(ARGS)

# The ImageNet pipeline on a CPU in about a minute: a small dataset of real photographs, then the :tiny config.
imagenet-tiny: venv
	test -d runs/tiny-data/resflax_tiny_jpeg || $(BIN)/resflax make-tiny-imagenet --out runs/tiny-data
	$(BIN)/resflax train --config=experiments/imagenet.py:tiny --config.data_dir=runs/tiny-data \
	  --workdir=runs/imagenet-tiny $(ARGS)

clean:
	rm -rf $(VENV) $(VENV_NEWEST) build dist src/*.egg-info .pytest_cache .ruff_cache

# docs/performance.md: resflax vs the PyTorch reference, side by side (installs the torch extra).
bench: venv
	$(BIN)/python -m pip install -q -e '.[torch]'
	$(BIN)/python benchmarks/report.py
