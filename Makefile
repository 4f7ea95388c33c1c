# vae_sweeps: `make help` lists the targets. Extra Hydra overrides go in ARGS="...".
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
# torch and torchvision, pinned together (the published results name this pair). On these
# machines 2.14.1 is a CUDA build that also runs on the CPU; on a GPU machine it uses the GPU.
# Another matching pair works too, e.g. TORCH="torch==2.9.1 torchvision==0.24.1".
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
# The MLflow server of `make server` / `make ui`: loopback only unless HOST says otherwise;
# BACKEND may be a PostgreSQL URI (postgresql+psycopg://user:password@host/db; psycopg 3 comes with
# the `server` extra that make install installs) as well; scripts/postgres-local.sh tries one.
BACKEND ?= sqlite:///mlruns/mlflow.db
ARTIFACTS ?= mlruns/artifacts
HOST ?= 127.0.0.1
PORT ?= 5000
# What `make bench` runs besides A, B and C (see benchmarks/bench.py --help).
BENCH_ARGS ?= --cnn-variants --sweep
# Options of `make bench-tuning` (benchmarks/tuning_bench.py --help), e.g. "--tiny" or "--only fixed".
TUNING_BENCH_ARGS ?=
# More `mlflow server` options, e.g. SERVER_ARGS="--workers 2".
SERVER_ARGS ?=
# MLflow 3's server also starts six job-runner processes (huey) for its GenAI features (scorers,
# prompt optimisation), which training runs never use: off unless SERVER_JOBS=true.
SERVER_JOBS ?= false
# The parts of the study (conf/experiment/) in the order they run: MNIST at 5 seeds, Fashion-MNIST
# at 3, then seeds 5-9 of the arms that 10 seeds were expected to decide; and what study-quick
# changes: 1 seed, 4 epochs, 10 importance samples for log p(x) instead of 50.
STUDY ?= table1 table2 table3 c_sweep priors fashion seeds10
QUICK ?= seed=0 trainer.max_epochs=4 eval.iw_samples=10
# The study's own store (checkpoints and figures beside it, not committed), and its published
# records under results/ (vae_sweeps/study_store.py): make study starts from those on a machine
# without the working store, and make results publishes the working store's records there
# (refusing a store with fewer counted runs than results/ unless DROP=id,id,... or DROP=all).
STUDY_STORE ?= mlruns/study
STUDY_URI = sqlite:///$(STUDY_STORE)/mlflow.db
PUBLISHED ?= results/store/mlflow.db
# A study not yet published keeps its progress here (make save-study, committed at each stop);
# make study continues from it, else from the published records; make results removes it.
PROGRESS ?= results/in-progress/mlflow.db
# Every part in turn; a part with failed jobs does not stop the others, but fails the target.
# ($(2): a prefix of each job's command; make study's unsets MLFLOW_TRACKING_URI, which would win over STUDY_URI.)
run_study = status=0; for part in $(STUDY); do $(2) $(PY) -m vae_sweeps experiment=$$part $(1) || status=1; done; exit $$status
# The study's store, from its committed records where this machine has none (make study, tune, tuned),
# and one part ($(1)) into it.
restore_study = $(PY) -m vae_sweeps.study_store restore $(if $(wildcard $(PROGRESS)),$(PROGRESS),$(PUBLISHED)) $(STUDY_STORE)/mlflow.db
study_part = env -u MLFLOW_TRACKING_URI $(PY) -m vae_sweeps experiment=$(1) tracking.uri=$(STUDY_URI) $(ARGS)

.DEFAULT_GOAL := help
.PHONY: help install train sweep study save-study study-quick tune tuned report evaluate results check-results test bench bench-tuning server ui clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: ## Create .venv and install torch, the project (editable), the test tools and the PostgreSQL driver
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[dev,server]"

train: ## Train the default job (mlp3, bce, latent 2, c=1, MNIST); ARGS="model=cnn ..." to change it
	$(PY) -m vae_sweeps $(ARGS)

sweep: ## Sweep the four architectures (Hydra multirun); ARGS adds overrides
	$(PY) -m vae_sweeps -m model=mlp2,mlp3,mlp4,cnn $(ARGS)

study: ## Run (or continue) every part of the study into its store, 30 epochs (many hours on a CPU)
	$(restore_study)
	@$(call run_study,tracking.uri=$(STUDY_URI) $(ARGS),env -u MLFLOW_TRACKING_URI)

save-study: ## Copy the running study's records (no artifacts) to results/in-progress/, to commit: make study continues from them
	$(PY) -m vae_sweeps.study_store publish $(STUDY_STORE)/mlflow.db $(PROGRESS)

study-quick: ## The study's grid with 1 seed and 4 epochs, for a first look (docs/study.md says what it costs)
	@$(call run_study,$(QUICK) $(ARGS))

tune: ## Equal-budget tuning of Table 1's architectures into the study's store (Optuna, ASHA; docs/tuning.md), then make tuned
	$(restore_study)
	$(call study_part,tune_table1)

tuned: ## Retrain each architecture's tuning winner at Table 1's seeds into the study's store (experiment=table1_tuned)
	$(restore_study)
	$(call study_part,table1_tuned)

report: ## Rebuild the study's tables, claims and figures from MLflow into reports/ (no training)
	$(PY) -m vae_sweeps.report $(ARGS)

evaluate: ## Fill in the end-of-run metrics that older runs lack (python -m vae_sweeps.backfill); no training
	$(PY) -m vae_sweeps.backfill $(ARGS)

results: ## Publish the study: back-fill its store, rebuild results/ and the README's summary, publish its records
	$(PY) -m vae_sweeps.backfill --tracking-uri $(STUDY_URI)
	$(PY) -m vae_sweeps.report --tracking-uri $(STUDY_URI) --out results --readme README.md --publish-store $(PUBLISHED) $(if $(DROP),--drop $(DROP))
	rm -rf $(dir $(PROGRESS))

check-results: ## Rebuild results/'s tables, claims and CSVs from the published store and compare, byte for byte
	$(PY) -m vae_sweeps.report --tracking-uri sqlite:///$(PUBLISHED) --check results

# The tests spend most of their time starting jobs in subprocesses, one core each: two tests run
# at once (pytest-xdist), each sent to whichever worker is free, but the tests that share a costly
# fixture to one worker, which builds it once (tests/conftest.py's scheduler for --dist loadscope).
TEST_ARGS ?= -n 2 --dist loadscope
test: ## Run the test suite
	$(PY) -m pytest $(TEST_ARGS)

bench: ## Training speed against a plain PyTorch loop, memory, CNN variants, sweep throughput (~6 min)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

bench-tuning: ## A tuning trial's fixed cost, and what pruning saves on 12 trials of mlp2 (~75 min; docs/tuning.md)
	$(PY) benchmarks/tuning_bench.py $(TUNING_BENCH_ARGS)

server: ## MLflow tracking server with served artifacts, http://127.0.0.1:5000 (HOST, PORT, BACKEND)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$(SERVER_JOBS) $(PY) -m mlflow server --backend-store-uri $(BACKEND) --artifacts-destination $(ARTIFACTS) --host $(HOST) --port $(PORT) $(SERVER_ARGS)

ui: ## Browse the runs in the MLflow UI (the same server as make server); open the link it prints
	@echo "Runs: http://$(HOST):$(PORT)/#/experiments/1/runs?workflowType=machine_learning (MLflow 3's 'Model training' view)"
	@$(MAKE) --no-print-directory server

clean: ## Remove outputs/ (logs, local checkpoints) and caches; keeps mlruns/ and data/
	rm -rf outputs multirun .pytest_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +
