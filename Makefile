# ChatStream: `make run` starts the whole system, `make test` runs every test. Both bootstrap first.
PY := .venv/bin/python
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: run test lint bootstrap clean

bootstrap:
	@python3 scripts/bootstrap.py install

# Every process runs under supervisord (docs/adr/0024): a role that dies is restarted, one that keeps crashing at
# start-up is given up on with a loud line, and Ctrl-C stops everything it started.
run: bootstrap
	@mkdir -p var
	@python3 scripts/bootstrap.py supervisor-conf $$([ -t 1 ] && echo --color) > /dev/null
	@echo "ChatStream: starting every role; the gateway is at http://127.0.0.1:$${CHATSTREAM_GATEWAY_PORT:-8000} (Ctrl-C stops all)"
	@$(PY) manage.py migrate --noinput -v 0
	@exec .venv/bin/supervisord -c var/supervisord.conf

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports
	.venv/bin/vulture

# pytest exit 5 (no tests collected) counts as a failure, like any other non-zero exit.
test:
	@CHATSTREAM_BOOTSTRAP_FOR_TESTS=1 python3 scripts/bootstrap.py install
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports
	.venv/bin/vulture
	$(PY) -m pytest

clean:
	rm -rf var/redis var/ferretdb var/ferretdb-state var/supervisord.* var/supervisor.sock var/log var/celerybeat-schedule
