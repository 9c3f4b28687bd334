# Two commands on a fresh machine (Python 3.11 + pip): `make run`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
USER ?= alice

.PHONY: run test test-fast token bench bench-quick bench-scaling bench-failover bench-outage bench-whatsapp admin clean

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

## Start a system, load it and print requests/s, latency percentiles and CPU per process: the REST
## scenarios, message.send_text, the single-process baseline and the direct NATS path, in one run.
bench: $(STAMP)
	$(PY) bench/run.py --baseline --nats-direct

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick --baseline --nats-direct

## context.incr with 1/2/4 workers x 1/2 gateways, then 1k/10k/100k sessions (a fresh system per row).
bench-scaling: $(STAMP)
	$(PY) bench/run.py --scaling

## Kill a worker under load, 10 times, and print recovery time, failures and lost writes.
bench-failover: $(STAMP)
	$(PY) bench/failover.py

## Stop Redis for 10 s under load: queued, applied, lost (must be 0), drain time, error rates.
bench-outage: $(STAMP)
	$(PY) bench/outage.py

## 10,000 simulated WhatsApp sessions paired in one worker: RSS per idle WORKING session, and
## message.send_text req/s over NATS and the gateway. ARGS="--quick" for 1,000 sessions.
bench-whatsapp: $(STAMP)
	$(PY) bench/whatsapp.py $(ARGS)

## Operator CLI against the running system: make admin ARGS="workers"
admin: $(STAMP)
	@$(VENV)/bin/sm-admin $(ARGS)

clean:
	rm -rf $(VENV) .data .pytest_cache
