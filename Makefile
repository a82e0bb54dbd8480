# `make run` and `make test` work on a fresh machine: each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline machines (CI, this workplace) use the dev copy of MedNIST beside the
# project instead of downloading the public tarball.
DEV_ARCHIVE := ../shared/data/mednist/MedNIST-dev.tar.gz
DEV_ARCHIVE_MD5 := d03cce2066dde455c59d5722b0253855
ifneq ($(wildcard $(DEV_ARCHIVE)),)
RUN_ARGS ?= --params "ingest.url=$(abspath $(DEV_ARCHIVE)),ingest.md5=$(DEV_ARCHIVE_MD5)"
endif
export KEDRO_DISABLE_TELEMETRY := 1

.PHONY: install run test lint viz mlflow-ui benchmark clean serve bento package conf-tarball chromium prometheus dag airflow benchmark-service benchmark-incremental benchmark-monitoring

install: $(STAMP)

# A fresh .venv whenever pyproject.toml changes: everything (Airflow included) must resolve
# in one pip call, which installing on top of an older environment does not do.
$(STAMP): pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e ".[dev,airflow]"
	touch $(STAMP)

run: install
	$(BIN)/kedro run $(RUN_ARGS)

# Test files spread over TEST_WORKERS processes (pytest-xdist): the suite waits on servers and
# subprocesses as much as it computes, so two workers keep both cores busy. One file stays on
# one worker, so a module's servers and trained projects are made once.
TEST_WORKERS ?= 2
test: install chromium prometheus
	$(BIN)/ruff check .
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

viz: install
	$(BIN)/kedro viz run

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

# The weekly Airflow DAG of the default pipeline in the s3 environment (conf/s3/airflow.yml).
dag: install
	$(BIN)/kedro airflow create --env s3 --pipelines __default__ --target-dir airflow_dags \
		--jinja-file src/medical_ct/airflow_dag_template.j2

# Airflow on this machine (scheduler, DAG processor, triggerer, UI on :8080) with the weekly DAG.
# `airflow standalone` starts its parts as `airflow ...` from PATH, so .venv/bin goes first;
# variables already set in the environment (the bucket's, AIRFLOW__*) win over these defaults.
AIRFLOW_HOME ?= $(CURDIR)/.airflow
airflow: install
	mkdir -p $(AIRFLOW_HOME)
	PATH="$(abspath $(BIN)):$$PATH" AIRFLOW_HOME="$(AIRFLOW_HOME)" \
		AIRFLOW__CORE__DAGS_FOLDER="$${AIRFLOW__CORE__DAGS_FOLDER:-$(CURDIR)/airflow_dags}" \
		AIRFLOW__CORE__LOAD_EXAMPLES="$${AIRFLOW__CORE__LOAD_EXAMPLES:-False}" \
		MEDICAL_CT_PROJECT_DIR="$${MEDICAL_CT_PROJECT_DIR:-$(CURDIR)}" \
		airflow standalone

# The BentoML service on http://localhost:3000 (the page, /predict, /feedback, /model).
serve: install
	$(BIN)/bentoml serve service:MedicalCT --port 3000

# A Bento with the current champion inside: serves without the MLflow store.
bento: install
	$(BIN)/python -m medical_ct.serving.packaging
	$(BIN)/bentoml build

# The wheel and the configuration for Airflow's workers (README "Deploy to an existing Airflow").
# `kedro package` leaves out only conf/local/*.yml: a credentials.yaml, a .json or a subfolder
# of conf/local went to every worker; the tarball is written again without conf/local's files
# (its empty folder stays: Kedro's default environment must exist).
package: install
	$(BIN)/kedro package
	$(MAKE) conf-tarball

conf-tarball:
	mkdir -p dist
	tar --exclude='conf/local/*' -czf dist/conf-medical_ct.tar.gz conf

# The page's browser test drives Debian's chromium (Playwright's download needs the internet).
chromium:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)

# The monitoring test scrapes the service with Debian's prometheus (and checks rules with promtool).
prometheus:
	test -x /usr/bin/prometheus || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)

benchmark-service: install
	$(BIN)/python benchmarks/bench_service.py

benchmark-incremental: install
	$(BIN)/python benchmarks/bench_incremental.py

benchmark-monitoring: install
	$(BIN)/python benchmarks/bench_monitoring.py

benchmark: install
	$(BIN)/python benchmarks/bench_pipeline.py

# Derived data only: data/01_raw holds what people sent (reviewed labels, the review audit,
# the prediction log), which nothing can make again; mlflow.db is kept too.
clean:
	rm -rf data/0[2-8]_*/* build .viz
