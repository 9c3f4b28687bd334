# Two commands on a fresh machine (Python 3.11 + pip): `make run`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
USER ?= alice

.PHONY: run test test-fast token bench bench-quick bench-failover bench-outage admin clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## Install everything and run the whole system locally (NATS, Redis, supervisor, workers, gateway).
run: $(STAMP)
	$(PY) -m sessionmgr.common.devstack

## The whole test suite, chaos tests included (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q

## The fast part only, for the edit-test loop.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

## Print a development JWT: make token USER=alice [SCOPE='sessions:admin']
token: $(STAMP)
	@$(PY) -m sessionmgr.common.devtoken $(USER) $(if $(SCOPE),--scope '$(SCOPE)')

## Load the running system (or start one) and print requests/s and latency percentiles.
bench: $(STAMP)
	$(PY) bench/run.py

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick

## Kill a worker under load, 10 times, and print recovery time, failures and lost writes.
bench-failover: $(STAMP)
	$(PY) bench/failover.py

## Stop Redis for 10 s under load: queued, applied, lost (must be 0), drain time, error rates.
bench-outage: $(STAMP)
	$(PY) bench/outage.py

## Operator CLI against the running system: make admin ARGS="workers"
admin: $(STAMP)
	@$(VENV)/bin/sm-admin $(ARGS)

clean:
	rm -rf $(VENV) .data .pytest_cache
