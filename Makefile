# fine_tune — `make help` lists the targets. Every target that needs the venv or the data depends on them,
# so any of them works as the first command on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXPERIMENT ?= experiments/fashion_transfer.yaml
N_TRIALS ?=
HOST ?= 127.0.0.1
UI_PORT ?= 5000
DASHBOARD_PORT ?= 8080
# The stores: local SQLite files under runs/ unless these point elsewhere (PostgreSQL, an MLflow server).
MLFLOW_TRACKING_URI ?= sqlite:///runs/mlflow.db
OPTUNA_STORAGE ?= sqlite:///runs/optuna.db
WORKERS ?=
# `make test`: processes sharing out the tests (a file with module fixtures, and the PostgreSQL tests, each stay in one:
# xdist_group); one per core halves the time on 2 cores.
TEST_WORKERS ?= 2
STUDY ?=
STUDIES ?=
TOP_K ?= 3
SEEDS ?= 3
# `make server`: an MLflow tracking server backed by PostgreSQL, serving artifacts from runs/server-artifacts.
SERVER_DB ?= postgresql://127.0.0.1:5432/fine_tune_mlflow
SERVER_ARGS ?=
# The venv is keyed on the hash of requirements.txt: unchanged pins -> nothing to install.
STAMP := $(VENV)/.installed-$(shell sha256sum requirements.txt | cut -c1-16)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.DEFAULT_GOAL := help
.PHONY: help venv data pretrain train sweep worker server ui dashboard report confirm curve rerun compare bench test clean distclean

help: ## list the targets
	@grep -hE '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP) ## create the virtualenv and install the pinned requirements (again only when they change)
$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

# Debian's data packages, installed here (root with apt) when missing: the library only finds files, never installs.
FASHION_DEB := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FORTUNES_DEB := /usr/share/games/fortunes/computers
APT_INSTALL = [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get install -y -q $(1) || \
	{ apt-get update -q && apt-get install -y -q $(1); }; } >/dev/null 2>&1
data: venv ## locate (or install, as root with apt) Fashion-MNIST and the fortunes corpus; extract what EXPERIMENT needs under data/
	@test -f $(FASHION_DEB) || test -n "$$FINE_TUNE_DATA" || test -f data/FashionMNIST/raw/train-images-idx3-ubyte || \
	  { $(call APT_INSTALL,dataset-fashion-mnist); } || true
	@test -f $(FORTUNES_DEB) || { $(call APT_INSTALL,fortunes fortunes-min); } || true
	$(PY) -m fine_tune data --config $(EXPERIMENT)

pretrain: data ## pretrain the backbone of EXPERIMENT on its source task (cached by config hash)
	$(PY) -m fine_tune pretrain --config $(EXPERIMENT)

train: data ## fine-tune once per EXPERIMENT, tracked in MLflow, and print the final table (ARGS="--set lr=0.01", ARGS=--no-track)
	$(PY) -m fine_tune train --config $(EXPERIMENT) $(ARGS)

rerun: data ## reproduce a tracked run and compare its numbers: make rerun RUN=<mlflow run id>
	@test -n "$(RUN)" || { echo "error: give the run to reproduce: make rerun RUN=<mlflow run id>"; exit 2; }
	$(PY) -m fine_tune rerun $(RUN) --config $(EXPERIMENT) $(ARGS)

sweep: data ## run or resume the Optuna study of EXPERIMENT, every trial tracked in MLflow (N_TRIALS=n, WORKERS=n)
	$(PY) -m fine_tune sweep --config $(EXPERIMENT) $(if $(WORKERS),--workers $(WORKERS)) $(if $(N_TRIALS),--n-trials $(N_TRIALS)) $(ARGS)

worker: data ## join a shared study from any machine: make worker OPTUNA_STORAGE=postgresql://... MLFLOW_TRACKING_URI=http://...
	@case "$(OPTUNA_STORAGE)" in sqlite*) echo "error: set OPTUNA_STORAGE to a shared database (postgresql://...)"; exit 2;; esac
	$(PY) -m fine_tune sweep --config $(EXPERIMENT) $(if $(WORKERS),--workers $(WORKERS)) $(if $(N_TRIALS),--n-trials $(N_TRIALS)) $(ARGS)

server: venv ## MLflow tracking server on PostgreSQL (SERVER_DB) with artifact serving, on http://127.0.0.1:5000
	@$(PY) -c "import psycopg,sys; u='$(SERVER_DB)'; c=psycopg.connect(u.rsplit('/',1)[0]+'/postgres', autocommit=True); n=u.rsplit('/',1)[1]; c.execute('select 1 from pg_database where datname=%s',(n,)).fetchone() or c.execute(f'CREATE DATABASE {n}')"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server --backend-store-uri $(SERVER_DB) \
	  --serve-artifacts --artifacts-destination runs/server-artifacts --host $(HOST) --port $(UI_PORT) --workers 2 $(SERVER_ARGS)

ui: venv ## MLflow UI over the same store: prints the URL of EXPERIMENT's runs table, on http://127.0.0.1:5000 (HOST/UI_PORT)
	$(PY) -m fine_tune ui --config $(EXPERIMENT) --host $(HOST) --port $(UI_PORT)

dashboard: venv ## optuna-dashboard over the same Optuna storage: prints its URL, http://127.0.0.1:8080 (HOST/DASHBOARD_PORT)
	@echo "optuna-dashboard: http://$(HOST):$(DASHBOARD_PORT)/dashboard (Ctrl-C stops it)"
	@$(VENV)/bin/optuna-dashboard $(OPTUNA_STORAGE) --host $(HOST) --port $(DASHBOARD_PORT)

report: venv ## write reports/<study>/report.{md,html} for EXPERIMENT's study (also logged to its MLflow parent run)
	$(PY) -m analysis report --config $(EXPERIMENT) $(if $(STUDY),--study '$(STUDY)') $(ARGS)

confirm: data ## re-train the top TOP_K trials with SEEDS new seeds (then `make report` adds CIs and McNemar)
	$(PY) -m fine_tune confirm --config $(EXPERIMENT) --top-k $(TOP_K) --seeds $(SEEDS)

curve: data ## label efficiency of EXPERIMENT: fine-tuned vs from scratch vs linear probe (or the best of each method) over label budgets -> reports/<study>-curve/
	$(PY) -m fine_tune curve --config $(EXPERIMENT) $(ARGS)
	$(PY) -m analysis curve --config $(EXPERIMENT)

compare: venv ## compare studies side by side: make compare STUDIES="a b" -> reports/compare-a-b/
	$(PY) -m analysis compare --studies $(STUDIES) $(ARGS)

# The peer (k) of `make bench` needs optuna-integration: installed for the
# benchmark only, beside the venv (their own dependencies are already in it).
BENCH_DEPS := .bench-deps/.installed-optuna-integration-5.0.0
$(BENCH_DEPS): $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target .bench-deps optuna-integration==5.0.0
	@rm -f .bench-deps/.installed-* && touch $@

bench: data $(BENCH_DEPS) ## speed side by side (tutorial loop, ours, FLOP floor, tracking, workers, pruning, start-up, load, the peers, what LoRA and LP-FT cost) -> reports/bench.md (ARGS="--only startup,load")
	$(PY) -m benchmarks.bench $(EXPERIMENT) $(ARGS)

test: data $(BENCH_DEPS) ## run the test suite (real data slices, real stores; TEST_WORKERS processes side by side)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

clean: ## delete generated runs and reports (keeps the venv and the data)
	rm -rf runs reports .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean ## also delete the venv and the extracted data
	rm -rf $(VENV) data
