# Set-up commands (see README): `make demo` runs the main job on the embedded default, `make test` runs the
# test suite; both bootstrap .venv and the system tools themselves.
.PHONY: demo test test-all bootstrap lock

bootstrap:
	@bash scripts/bootstrap.sh

# Regenerate requirements/*.lock from pyproject.toml after changing a dependency (docs/operations.md).
lock:
	@bash scripts/lock.sh

demo: bootstrap
	.venv/bin/retinalgpt demo

test: bootstrap
	.venv/bin/python -m pytest -n 2 --dist loadgroup

test-all: bootstrap
	.venv/bin/python -m pytest -n 2 --dist loadgroup -m ''
