# resflax: every target creates/uses .venv (target `venv`, idempotent).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=
SCHEDULE ?= 1.0
# The shared CIFAR-10 copy beside this checkout is used when TFDS_DATA_DIR is not set.
ifneq ($(wildcard ../shared/tfds/cifar10),)
export TFDS_DATA_DIR ?= $(abspath ../shared/tfds)
endif

CIFAR_MODELS := resnet20 resnet32 resnet44 resnet56 resnet110 resnet1202 plain20 plain32 plain44 plain56 plain110

.PHONY: venv test test-fast lint demo data summary bench clean $(addprefix cifar-,$(CIFAR_MODELS))

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check src tests benchmarks experiments

summary: venv
	$(BIN)/resflax summary

# Finds CIFAR-10 (config data_dir, $$TFDS_DATA_DIR, ~/tensorflow_datasets); prepares it once if missing.
data: venv
	@$(BIN)/resflax prepare-data 2>/dev/null || { \
	  echo "CIFAR-10 not found; installing the preparation extra (TensorFlow) and downloading it once"; \
	  $(BIN)/python -m pip install -q -e '.[prepare]' && $(BIN)/resflax prepare-data; }

# A CPU-sized run: ResNet-20 on a ~600-step scaled schedule, ends with its test error.
demo: data
	$(BIN)/resflax train --config=experiments/cifar10.py:runlocal --workdir=runs/demo $(ARGS)

# The paper's recipe (64k iterations) for each CIFAR-10 model; SCHEDULE=0.1 scales every step count.
$(addprefix cifar-,$(CIFAR_MODELS)): cifar-%: data
	$(BIN)/resflax train --config=experiments/cifar10.py:$*,scale=$(SCHEDULE) --workdir=runs/cifar-$*$(if $(filter-out 1.0,$(SCHEDULE)),-s$(SCHEDULE)) $(ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
