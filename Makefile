# Set-up and common tasks. `make demo` and `make test` create .venv and install when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-mask test test-all install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23"
	# torch/torchvision are pinned to the releases available on the build machines
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

demo: $(STAMP)
	$(PY) tools/train_net.py --config-file configs/demo/retinanet_tiny_shapes.yaml OUTPUT_DIR output/demo

demo-mask: $(STAMP)
	$(PY) tools/train_net.py --config-file configs/demo/mask_rcnn_tiny_shapes.yaml OUTPUT_DIR output/demo_mask

clean:
	rm -rf output
