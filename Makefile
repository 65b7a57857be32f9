# fedgap: the two commands a fresh clone needs are `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.core-stamp
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/doctor

.PHONY: install install-core run test test-slow bench lint clean

# Re-installs only when pyproject.toml or this Makefile (its install lines) changed since the last install.
# `make run` needs only fedgap and its dependencies (half the install time of the extras); the test, bench and
# lint targets add the dev tools and the optional integrations (Ray, TensorBoard, MLflow, Keras) on top;
# test-slow adds JAX (to open an exported Keras file under another backend).
$(CORE): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(PY) -m pip install --quiet -e '.[dev,ray,tensorboard,mlflow,keras]'
	touch $(STAMP)

install-core: $(CORE)

install: $(STAMP)

run: install-core
	$(VENV)/bin/fedgap doctor --preset quick --out $(OUT)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pip install --quiet -e '.[jax]'
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/run_engines.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
