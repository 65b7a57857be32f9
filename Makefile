# fedgap: the two commands a fresh clone needs are `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.core-stamp
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/doctor
SIM_VENV  := .venv-flower-sim
SIM_PY    := $(SIM_VENV)/bin/python
SIM_STAMP := $(SIM_VENV)/.installed-stamp

.PHONY: install install-core run run-keras test test-slow test-flower bench lint clean

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
	$(PY) -m pip install --quiet -e '.[dev,ray,tensorboard,mlflow,flower,keras]'
	touch $(STAMP)

# Flower's simulation engine pins an older Ray than the ray extra: its test gets an environment of its own.
$(SIM_STAMP): pyproject.toml Makefile
	test -x $(SIM_PY) || $(PYTHON) -m venv $(SIM_VENV)
	$(SIM_PY) -m pip install --quiet --upgrade "pip>=24"
	$(SIM_PY) -m pip install --quiet -e '.[dev,flower-simulation]'
	touch $(SIM_STAMP)

KERAS_STAMP := $(VENV)/.keras-stamp
$(KERAS_STAMP): $(CORE)
	$(PY) -m pip install --quiet -e '.[keras]'
	touch $(KERAS_STAMP)

install-core: $(CORE)

install: $(STAMP)

run: install-core
	$(VENV)/bin/fedgap doctor --preset quick --out $(OUT)

# The same doctor on the seed's network written in Keras (Keras defaults untouched: docs/keras.md).
run-keras: $(KERAS_STAMP)
	$(VENV)/bin/fedgap doctor --preset quick model.name=examples/keras_mobilenet.py:build --out $(OUT)-keras

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pip install --quiet -e '.[jax]'
	$(PY) -m pytest -q -m slow

# The exported Flower app on Flower's two runtimes (docs/flower.md): a SuperLink and SuperNodes on loopback
# (this environment, base flwr), and the simulation engine (.venv-flower-sim, flwr[simulation] and its Ray).
test-flower: install $(SIM_STAMP)
	$(PY) -m pytest -q -m flower tests/test_flower_deploy.py
	$(SIM_PY) -m pytest -q -m flower tests/test_export_flower.py tests/test_flower_bench.py

# flower-sim, the Flower runner, runs in .venv-flower-sim (benchmarks/flower_sim.py).
bench: install $(SIM_STAMP)
	$(PY) benchmarks/run_engines.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(SIM_VENV) runs .pytest_cache
