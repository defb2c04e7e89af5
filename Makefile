# Kiln — every target is documented in the README.
SHELL := /bin/bash
PYTHON ?= python3
TOOLS := .tools
UV := $(shell command -v uv 2>/dev/null || echo $(TOOLS)/bin/uv)
RUN := $(UV) run --frozen
PACKAGES := kiln_contracts kiln_runtime kiln_devstack kiln_cli kiln_gateway kiln_agent kiln_sandbox kiln_budget kiln_snapshot kiln_webhooks

.PHONY: help install demo up test lint fmt typecheck unit integration e2e schemas bench clean browser

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv

install: $(if $(shell command -v uv 2>/dev/null),,$(TOOLS)/bin/uv)  ## install everything (uv, the workspace, dev tools)
	$(UV) sync --frozen --python $(PYTHON)

demo: install  ## run a demo build on the embedded stack, offline
	$(RUN) kiln demo

up: install  ## start the whole local stack and keep it running (Ctrl-C stops it)
	$(RUN) kiln up

lint: install  ## ruff (format check + lint) and the import contracts
	$(RUN) ruff format --check .
	$(RUN) ruff check .
	$(RUN) lint-imports

fmt: install  ## format the code
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

typecheck: install  ## mypy (the packages and bench/)
	$(RUN) mypy $(foreach p,$(PACKAGES),-p $(p))
	$(RUN) mypy bench

schemas: install  ## regenerate contracts/schemas (JSON Schema of each message + the AsyncAPI document)
	$(RUN) python -m kiln_contracts.schemas
	$(RUN) python -m kiln_runtime.asyncapi

unit: install  ## unit tests only
	$(RUN) pytest tests/unit -q

integration: install  ## integration tests (real NATS, Postgres, Redis, S3 API)
	$(RUN) pytest tests/integration -q

browser:  ## Debian's Chromium for the dashboard test (idempotent; fails loudly if it cannot)
	bash scripts/install-browser.sh

e2e: install browser  ## end-to-end tests (every service as a process; the dashboard in Chromium)
	$(RUN) pytest tests/e2e -q

TEST_WORKERS ?= 2

test: lint typecheck browser  ## the whole suite: lint, types, unit, integration, e2e (TEST_WORKERS processes)
	$(RUN) pytest -q -p no:cacheprovider --durations=10 -n $(TEST_WORKERS) --dist loadgroup

clean:  ## remove local state
	rm -rf .kiln .pytest_cache .mypy_cache .ruff_cache

# ---------------------------------------------------------------- chaos on a NATS cluster (docs/BENCHMARKS.md)
.PHONY: chaos-cluster
CHAOS_BUILDS ?= 8
CHAOS_KILLS ?= 10

chaos-cluster: install  ## 3-node JetStream cluster, 2 replicas per service: leader SIGKILL, node SIGSTOP, service kills
	KILN_CHAOS_BUILDS=$(CHAOS_BUILDS) KILN_CHAOS_KILLS=$(CHAOS_KILLS) $(RUN) pytest tests/e2e/test_chaos_cluster.py -q -s -p no:cacheprovider

# ---------------------------------------------------------------- dependency outages (docs/OPERATIONS.md)
.PHONY: outages
OUTAGE_S ?= 30

outages: install  ## Postgres, Redis and S3 each down for OUTAGE_S seconds in the middle of builds
	KILN_OUTAGE_S=$(OUTAGE_S) $(RUN) pytest tests/e2e/test_outages.py -q -s -p no:cacheprovider

# ---------------------------------------------------------------- deployment (deploy/, docs/OPERATIONS.md)
.PHONY: deploy-check nats-render
DEPLOY_OUT := .kiln/deploy

deploy-check: install  ## render every kustomize overlay and validate it; check compose and generated NATS files
	@mkdir -p $(DEPLOY_OUT)
	@set -e; for overlay in $$(ls deploy/k8s/overlays); do \
		echo "kubectl kustomize deploy/k8s/overlays/$$overlay"; \
		$(RUN) kubectl kustomize deploy/k8s/overlays/$$overlay > $(DEPLOY_OUT)/$$overlay.yaml; \
		$(RUN) kubernetes-validate --strict --quiet --no-warn -k 1.33.0 $(DEPLOY_OUT)/$$overlay.yaml; \
	done
	$(RUN) python deploy/check.py

nats-render: install  ## regenerate the NATS users (Helm values, nats-server.conf) from deploy/nats/permissions.yaml
	$(RUN) python deploy/nats/render.py

# ---------------------------------------------------------------- benchmarks (bench/, docs/BENCHMARKS.md)
.PHONY: bench-roundtrip bench-concurrency bench-concurrency-real bench-sleeping bench-recovery bench-snapshot

bench: bench-roundtrip bench-concurrency bench-sleeping bench-recovery bench-snapshot bench-bookkeeping bench-request-body bench-model-client bench-bus bench-overshoot bench-long  ## run every benchmark (minutes; figures in docs/BENCHMARKS.md)

bench-roundtrip: install  ## tool-call round trip through Kiln vs a bare JetStream round trip
	$(RUN) python bench/roundtrip.py

bench-concurrency: install  ## one agent, 100/300/1,000 concurrent builds, model with 1 s latency
	$(RUN) python bench/concurrency.py

bench-concurrency-real: install  ## one agent, 1,000 and 5,000 builds, model latency lognormal (median 8 s)
	$(RUN) python bench/concurrency.py --builds 1000,5000 --latency-s 8 --sigma 0.6 --measure-s 60

bench-sleeping: install  ## 10,000 sleeping builds: agent RSS and task growth, sandboxes alive
	$(RUN) python bench/sleeping.py

bench-recovery: install  ## SIGKILL the agent mid-build: time to the next event from a second replica
	$(RUN) python bench/recovery.py

bench-snapshot: install  ## 2,000 files / ~50 MB, one file changed: Kiln's incremental snapshot vs tar czf + upload
	$(RUN) python bench/snapshot.py

.PHONY: bench-bookkeeping bench-request-body bench-model-client bench-bus bench-overshoot bench-long
bench-bookkeeping: install  ## the agent's per-iteration bookkeeping near iteration 1 and 200 of one build (target: ratio <= 1.5)
	$(RUN) python bench/bookkeeping.py

bench-request-body: install  ## the agent's CPU per request body at iteration 1 and 200: joined from the turns' JSON vs encoded whole
	$(RUN) python bench/request_body.py

bench-model-client: install  ## the agent's CPU per model call, the SDK's default HTTP transport vs its aiohttp one
	$(RUN) python bench/model_client.py

bench-bus: install  ## CPU per published and per consumed message: Kiln vs bare nats-py
	$(RUN) python bench/bus_consume.py

bench-overshoot: install  ## 20 concurrent builds of one user: spend past the allowance, before (BEFORE=<commit>) and with the budget gates
	$(RUN) python bench/overshoot.py $(if $(BEFORE),--before $(BEFORE))

bench-long: install  ## a 200-iteration scripted build with large writes: completes; cache-read ratio, compactions, summaries
	$(RUN) python bench/long_build.py
