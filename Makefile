# ServeML: `make run` brings the whole system up on http://127.0.0.1:8000,
# `make test` runs the whole test suite. Both install what they need first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: run test lint format bench compat install install-dev migrate superuser aws-smoke clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: requirements.txt | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt -r requirements-dev.txt
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

migrate: install
	$(BIN)/python manage.py migrate --noinput

## Start Redis (if needed), the Celery worker and beat (the reaper), the runtime and the web app. Ctrl-C stops them all.
run: migrate
	@bin/ensure-sandbox
	@processes="$$(bin/ensure-redis)" && exec $(BIN)/honcho start -f Procfile $$processes

## Create an operator account for the Django admin.
superuser: migrate
	$(BIN)/python manage.py createsuperuser

## ruff's lint and format checks (configured in pyproject.toml); `make test` runs them first.
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Apply ruff's formatting and safe fixes.
format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## The lint checks, then the whole test suite with the real services it needs (Redis, worker, runtime, Chromium).
test: lint
	bin/test-prerequisites
	bin/run-tests

## ServeML against FastAPI, MLServer and BentoML (each at its best) on this machine, what metrics cost the
## runtime, and the Lambda image (in the tests' dockerd, started and stopped): bench/results.md, bench/results.png.
bench: install-dev
	bin/test-prerequisites
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r bench/requirements.txt
	$(BIN)/python bench/run.py

## Every scikit-learn estimator, saved by every supported release in every format, through ServeML's scan,
## allowlist and sandboxed restricted loader: docs/compat.md. Cached under var/compat; niced, one process at a time.
compat: install-dev
	@bin/ensure-sandbox
	bin/compat

## Opt-in: deploy the iris model to a real AWS account and tear it down (skipped without credentials).
## scikit-learn 1.8+ needs an Amazon Linux 2023 base image, hence these defaults here.
aws-smoke: migrate
	SERVEML_LAMBDA_BASE_IMAGE=$${SERVEML_LAMBDA_BASE_IMAGE:-public.ecr.aws/lambda/python:3.12} \
	SERVEML_LAMBDA_PYTHON_VERSION=$${SERVEML_LAMBDA_PYTHON_VERSION:-3.12} \
	SERVEML_LAMBDA_MANYLINUX=$${SERVEML_LAMBDA_MANYLINUX:-manylinux_2_28} \
	$(BIN)/python manage.py aws_smoke

clean:
	rm -rf $(VENV) var
