# Two commands: `make demo` and `make test`. Both create or reuse .venv.
# torch is installed first, pinned, because any other spec pulls the CUDA build
# (gigabytes); with 2.13.0 present, the `torch` extra's range installs nothing more.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0

.PHONY: demo demo-dit test venv-test venv-demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# A stamp per extra set, remade when the package metadata changes.
$(VENV)/.stamp-demo: setup.cfg pyproject.toml | $(PY)
	$(PIP) install -q -e '.[demo]'
	touch $@

$(VENV)/.stamp-test: setup.cfg pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[torch,demo,test]'
	touch $@

venv-demo: $(VENV)/.stamp-demo
venv-test: $(VENV)/.stamp-test

demo: venv-demo
	$(PY) train.py --config=configs/digits.py --workdir=runs/digits
	$(PY) sample.py --workdir=runs/digits --num_samples=100 --out=runs/digits/samples.png,runs/digits/samples.npz
	$(PY) -m diffax.evaluation.digits_classifier runs/digits/samples.npz

# The same, with the small DiT of configs/dit_digits.py.
demo-dit: venv-demo
	$(PY) train.py --config=configs/dit_digits.py --workdir=runs/dit_digits
	$(PY) sample.py --workdir=runs/dit_digits --num_samples=100 --out=runs/dit_digits/samples.png,runs/dit_digits/samples.npz
	$(PY) -m diffax.evaluation.digits_classifier runs/dit_digits/samples.npz

test: venv-test
	$(PY) -m pytest -q -n 2 --durations=15 tests

bench: venv-test
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
