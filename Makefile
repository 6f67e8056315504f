# async_dbbridge developer tasks.  `make help` lists them.
#
#   make test PYTEST_ARGS="-k foo"     extra pytest args for every matrix run
#   BACKENDS=sqlite DJANGO_SERIES=52 make test     narrow the matrix
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help bootstrap bootstrap-all demo lint test matrix peers docs bench clean

help:
	@echo "make bootstrap      create/update .venv (Python 3.11, Django 5.2)"
	@echo "make bootstrap-all  also .venv-dj61 (Python 3.13, Django 6.1)"
	@echo "make demo           run the demo ASGI app on 127.0.0.1:8000"
	@echo "make lint           ruff check, ruff format --check, mypy"
	@echo "make test           bootstrap-all + lint + pytest matrix (PYTEST_ARGS, BACKENDS, DJANGO_SERIES)"
	@echo "make matrix         only the pytest matrix (no bootstrap, no lint)"
	@echo "make peers          asgiref's and Django's own suites with the bridge (scripts/peer_suites.sh)"
	@echo "make docs           mkdocs build --strict"
	@echo "make bench          run benchmarks/bench_*.py"
	@echo "make clean          remove venvs, stamps and caches"

bootstrap:
	@scripts/bootstrap.sh dev

bootstrap-all:
	@scripts/bootstrap.sh all

demo: bootstrap
	@scripts/run_demo.sh

# All three checks run even if one fails; the target fails if any did.
lint: bootstrap
	@rc=0; \
	echo "+ ruff check ."; $(VENV)/bin/ruff check . || rc=1; \
	echo "+ ruff format --check ."; $(VENV)/bin/ruff format --check . || rc=1; \
	echo "+ mypy"; $(VENV)/bin/mypy || rc=1; \
	if [ $$rc -ne 0 ]; then echo "lint: FAILED"; else echo "lint: ok"; fi; \
	exit $$rc

# Lint failures do not hide test results: the matrix runs either way, and the
# target fails if lint or any matrix run failed.
test: bootstrap-all
	@lint_rc=0; $(MAKE) --no-print-directory lint || lint_rc=1; \
	scripts/test_matrix.sh $(PYTEST_ARGS); test_rc=$$?; \
	if [ $$lint_rc -ne 0 ]; then echo "make test: lint FAILED"; fi; \
	if [ $$test_rc -ne 0 ]; then echo "make test: test matrix FAILED"; fi; \
	[ $$lint_rc -eq 0 ] && [ $$test_rc -eq 0 ]

matrix:
	@scripts/test_matrix.sh $(PYTEST_ARGS)

# --strict fails on broken links and unresolved cross-references; the markup
# check then fails on Sphinx roles or `::` blocks left raw in the built pages.
docs:
	@if [ ! -f mkdocs.yml ]; then echo "docs: no mkdocs.yml yet, nothing to build"; exit 0; fi; \
	scripts/bootstrap.sh dev && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site \
	&& $(PY) scripts/check_docs_markup.py site

bench:
	@scripts/bootstrap.sh dev --bench
	@shopt -s nullglob; files=(benchmarks/bench_*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "bench: no benchmarks/bench_*.py yet"; exit 0; fi; \
	rc=0; for f in "$${files[@]}"; do \
		echo "== $$f =="; $(PY) "$$f" || { echo "bench: $$f FAILED"; rc=1; }; \
	done; exit $$rc

# Downloads the sdists of the installed asgiref and Django (cached) and runs
# their suites with the bridge in place; expected failures: tests/peers/.
peers: bootstrap-all
	@scripts/peer_suites.sh

clean:
	rm -rf .venv .venv-dj61 .bootstrap-* site .mypy_cache .ruff_cache .pytest_cache build dist
	rm -rf ./*.egg-info .coverage .coverage.* htmlcov coverage.xml
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf {} +
	find . -path ./.git -prune -o -name '*.sqlite3' -type f -exec rm -f {} +
