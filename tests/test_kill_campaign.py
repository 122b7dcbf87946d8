"""A tiny run SIGKILLed again and again at random moments, some of them while a checkpoint is being written,
and resumed after each kill, ends with exactly the uninterrupted run's weights (`make test-slow`)."""
from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from diffax.train import checkpoint
from diffax.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY_FLAGS, _params, tiny_config  # noqa: E402

STEPS = 150
MIN_KILLS = 10
SEED = 20261126  # the campaign's delays and kinds of kill; the moments they land on still vary with load

# tiny_config(STEPS) with a checkpoint every 5 steps, as command-line overrides.
OVERRIDES = [*TINY_FLAGS, f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=5",
             "--config.train.log_every=1", "--config.train.sample_every=0"]


def _writing(workdir: Path) -> list[Path]:
    """Orbax's temporary directories: a step being written (renamed to `<step>` once complete)."""
    return sorted((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def _start(workdir: Path, log: Path) -> tuple[subprocess.Popen, queue.Queue]:
    """train.py on `workdir` (resuming when it has a checkpoint), its stdout lines arriving on a queue."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}",
                             f"--workdir={workdir}", *OVERRIDES], cwd=workdir.parent, text=True,
                            stdout=subprocess.PIPE, stderr=log.open("w"))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return proc, lines


def _wait_for_steps(proc: subprocess.Popen, lines: queue.Queue, count: int, deadline: float) -> bool:
    """Until the child has printed `count` step lines (one per step: log_every=1); False if it exits first or
    the deadline passes."""
    while count > 0 and time.time() < deadline:
        try:
            count -= lines.get(timeout=0.01).startswith("step ")
        except queue.Empty:
            if proc.poll() is not None:
                return False
    return count <= 0


@pytest.mark.slow
def test_kill_campaign_ends_with_the_uninterrupted_weights(tmp_path):
    """At least MIN_KILLS SIGKILLs of three kinds, each followed by a resume, until the run completes:
    'startup' (a random moment before the first step: importing, restoring or compiling), 'random' (a
    random moment after a random step) and 'write' (the moment the n-th checkpoint's temporary directory
    appears).
    The final weights equal the uninterrupted run's, as in test_train's single-kill test: both runs use the
    same 8 simulated devices, so an exact resume is bit-identical and the tolerance absorbs only rounding."""
    rng = np.random.default_rng(SEED)
    workdir = tmp_path / "killed"
    workdir.mkdir()
    kills: list[dict] = []
    start_time = time.time()
    for attempt in range(4 * MIN_KILLS):
        proc, lines = _start(workdir, tmp_path / f"stderr_{attempt}.txt")
        deadline = time.time() + 600
        if len(kills) >= MIN_KILLS:  # the campaign is over: this resume runs to the end
            assert proc.wait(timeout=900) == 0, (tmp_path / f"stderr_{attempt}.txt").read_text()[-3000:]
            break
        # Each kind bounds the steps an attempt can add (<= 12 + what 0.5 s allows, or 3 saves), so the
        # campaign outlasts MIN_KILLS kills however fast the machine is.
        kind = rng.choice(["startup", "random", "write"], p=[0.2, 0.4, 0.4])
        if kind == "startup":  # before the first step
            _wait_for_steps(proc, lines, 1, time.time() + rng.uniform(0.5, 12.0))
        elif kind == "random":  # within a step or a save after the k-th step of this attempt, k in 1..10
            if _wait_for_steps(proc, lines, rng.integers(1, 11), deadline):
                time.sleep(rng.uniform(0.0, 0.5))
        else:  # the moment the n-th save of this attempt appears, n in 1..3
            seen, wanted = set(), rng.integers(1, 4)
            while proc.poll() is None and time.time() < deadline:
                seen.update(_writing(workdir))
                if len(seen) >= wanted:
                    break
                time.sleep(0.001)
        writing = _writing(workdir)
        proc.send_signal(signal.SIGKILL)
        returncode = proc.wait()
        assert returncode in (0, -signal.SIGKILL), (tmp_path / f"stderr_{attempt}.txt").read_text()[-3000:]
        if returncode == 0:  # the run finished before the kill landed
            pytest.fail(f"the run completed after {len(kills)} kills; make STEPS larger")
        latest = checkpoint.make_manager(workdir, read_only=True).latest_step()
        kills.append(dict(kind=str(kind), during_write=bool(writing), latest_step=latest))
    else:
        pytest.fail(f"the run did not complete within {4 * MIN_KILLS} attempts: {kills}")
    campaign_seconds = time.time() - start_time

    assert checkpoint.make_manager(workdir, read_only=True).latest_step() == STEPS
    whole = tmp_path / "whole"
    train_and_evaluate(tiny_config(steps=STEPS), whole)  # log and checkpoint intervals do not change weights
    for a, b in zip(_params(workdir), _params(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    during_write = sum(k["during_write"] for k in kills)
    print(f"\nkill campaign: {len(kills)} kills ({during_write} during a checkpoint write; kinds "
          f"{[k['kind'] for k in kills]}; latest step after each {[k['latest_step'] for k in kills]}) in "
          f"{campaign_seconds:.0f} s")
    assert len(kills) >= MIN_KILLS
    assert during_write >= 1, kills

