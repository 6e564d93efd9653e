# Set-up commands (see README): `make demo` runs the main job on the embedded default, `make test` runs the
# test suite; both bootstrap .venv and the system tools themselves.
.PHONY: demo test test-all bootstrap

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/retinalgpt demo

test: bootstrap
	.venv/bin/python -m pytest -n 2 --dist loadgroup

test-all: bootstrap
	.venv/bin/python -m pytest -n 2 --dist loadgroup -m ''
