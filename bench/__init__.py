"""Benchmarks of diffax against diffusers on torch: same weights, same machine, same run.

    python -m bench.run_all                    # every benchmark at CPU-friendly sizes, one summary table
    python -m bench.unet_sampling --help       # the digits U-Net: one forward and a whole DDIM + CFG run
    python -m bench.dit_forward --help         # a DiT forward

Each benchmark builds the diffusers model with random weights, saves it as a diffusers folder, converts that
folder with diffax's converter, checks that both libraries give the same numbers, and only then times them,
alternating the two so that load from other work on the machine hits both alike. Results go to
bench/results/<name>.json; docs/benchmarks.md explains every reported number.
"""
import os

# On a shared CPU, OpenMP's default busy-wait makes torch's worker threads spin against other processes:
# a 2-thread forward measured 10x slower than a 1-thread one here. Passive waiting removes that artefact
# (it must be set before torch loads OpenMP, hence here); a caller's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
