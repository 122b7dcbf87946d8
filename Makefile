# Two commands: `make demo` and `make test`. Both create or reuse .venv.
# Every install takes the tested versions from constraints.txt (pyproject.toml holds the supported ranges).
# torch is installed first, alone and pinned, because any other spec pulls the CUDA build (gigabytes);
# with 2.13.0 present, the `torch` extra's range installs nothing more.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_INSTALL := $(PIP) install -q -c constraints.txt
TORCH := torch==2.13.0

.PHONY: demo demo-dit demo-ldm test test-slow venv-test venv-demo venv-bench bench bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel

# A stamp per extra set, remade when the package metadata or the tested versions change.
$(VENV)/.stamp-demo: pyproject.toml constraints.txt | $(PY)
	$(PIP_INSTALL) -e '.[demo]'
	touch $@

# pytorch-fid (the Inception parity test's reference) goes in without its torchvision: PyPI's torchvision
# for torch 2.13 is a CUDA build that cannot load beside the CPU torch; the test supplies the blocks it needs.
$(VENV)/.stamp-test: pyproject.toml constraints.txt | $(PY)
	$(PIP_INSTALL) $(TORCH)
	$(PIP_INSTALL) -e '.[torch,demo,test]'
	$(PIP_INSTALL) --no-deps pytorch-fid
	touch $@

$(VENV)/.stamp-bench: $(VENV)/.stamp-test
	$(PIP_INSTALL) -e '.[torch,demo,test,bench]'
	touch $@

# Training on a CPU spends much of each step in page faults: XLA:CPU allocates its buffers for every call and
# glibc maps large ones afresh. Where the kernel gives transparent huge pages on request (glibc >= 2.35;
# ignored elsewhere), this makes the digits step about 25% faster with the same results (docs/training.md).
# `make demo TRAIN_ENV=` trains without it.
TRAIN_ENV ?= GLIBC_TUNABLES=glibc.malloc.hugetlb=1

venv-demo: $(VENV)/.stamp-demo
venv-test: $(VENV)/.stamp-test
venv-bench: $(VENV)/.stamp-bench

demo: venv-demo
	$(TRAIN_ENV) $(PY) train.py --config=configs/digits.py --workdir=runs/digits
	$(PY) sample.py --workdir=runs/digits --num_samples=100 --out=runs/digits/samples.png,runs/digits/samples.npz
	$(PY) -m diffax.evaluation.digits_classifier runs/digits/samples.npz
	$(PY) -m diffax.evaluation.fid runs/digits/samples.npz digits

# The same, with the small DiT of configs/dit_digits.py.
demo-dit: venv-demo
	$(TRAIN_ENV) $(PY) train.py --config=configs/dit_digits.py --workdir=runs/dit_digits
	$(PY) sample.py --workdir=runs/dit_digits --num_samples=100 --out=runs/dit_digits/samples.png,runs/dit_digits/samples.npz
	$(PY) -m diffax.evaluation.digits_classifier runs/dit_digits/samples.npz
	$(PY) -m diffax.evaluation.fid runs/dit_digits/samples.npz digits

# Latent diffusion from nothing (configs/ldm_digits_vae.py, configs/ldm_digits.py): an AutoencoderKL, a frozen
# random text encoder and its tokenizer, the latent cache, a text-conditioned U-Net, a diffusers
# StableDiffusionPipeline folder (runs/ldm_digits/export), and the class accuracy of prompt-conditioned samples
# from diffax and from diffusers on torch (hence the test extras).
LDM := -m diffax.train.latent_diffusion --config=configs/ldm_digits.py
demo-ldm: venv-test
	$(TRAIN_ENV) $(PY) train.py --config=configs/ldm_digits_vae.py --workdir=runs/ldm_digits/vae
	$(PY) $(LDM) --action=text_encoder
	$(PY) -m diffax.data.cache --config=configs/ldm_digits.py:cache
	$(TRAIN_ENV) $(PY) train.py --config=configs/ldm_digits.py --workdir=runs/ldm_digits/unet
	$(PY) $(LDM) --action=export --workdir=runs/ldm_digits/unet --out=runs/ldm_digits/export
	$(PY) $(LDM) --action=evaluate --out=runs/ldm_digits/export --grid=docs/images/ldm_digits_samples.png \
		--json=runs/ldm_digits/accuracy.json

test: venv-test
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

# The full-size tests that `make test` leaves out (pyproject's addopts deselect `slow`).
# pytest's exit status 5 (no test carries the mark yet) counts as success.
test-slow: venv-test
	$(PY) -m pytest -q -m slow --durations=15 tests || [ $$? -eq 5 ]

# Every case against diffusers/torch at full size (~30 min on 2 cores; run it on an otherwise idle machine),
# rewriting docs/benchmarks.md's results and plot; bench-quick: the small sizes, docs untouched.
bench: venv-bench
	$(PY) -m bench.run_all --docs

bench-quick: venv-bench
	$(PY) -m bench.run_all --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
