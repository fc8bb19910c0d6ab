# ChatStream: `make run` starts the whole system, `make test` runs every test. Both bootstrap first.
PY := .venv/bin/python
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: run test lint bootstrap procfile clean

bootstrap:
	@python3 scripts/bootstrap.py install

run: bootstrap
	@mkdir -p var
	@python3 scripts/bootstrap.py procfile > var/Procfile
	@echo "ChatStream: starting every role; the gateway is at http://$${CHATSTREAM_GATEWAY_HOST:-127.0.0.1}:$${CHATSTREAM_GATEWAY_PORT:-8000} (Ctrl-C stops all)"
	@$(PY) manage.py migrate --noinput -v 0
	@exec .venv/bin/honcho -f var/Procfile -d . start

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports

# pytest exit 5 (no tests collected) counts as a failure, like any other non-zero exit.
test:
	@CHATSTREAM_BOOTSTRAP_FOR_TESTS=1 python3 scripts/bootstrap.py install
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports
	$(PY) -m pytest

clean:
	rm -rf var/redis var/ferretdb var/ferretdb-state var/Procfile var/celerybeat-schedule
