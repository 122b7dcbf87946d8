"""Training metrics: metrics.jsonl and TensorBoard event files at the logged steps, MFU, process 0 only."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from diffax.train import metrics as metrics_lib
from diffax.train.loop import train_and_evaluate
from diffax.train.state import make_schedule

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_config  # noqa: E402

KEYS = {"step", "loss", "grad_norm", "learning_rate", "steps_per_sec", "images_per_sec", "skipped"}


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the TFRecord event files in `logdir` (tensorboardX ships no reader)."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, object]:
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(steps=4)  # logs at 2 and 4; the checkpoint at 3 reads the metrics but logs nothing
    config.train.lr_schedule = "cosine"  # the default schedule's logged learning rates
    config.train.peak_flops = 1e12
    train_and_evaluate(config, workdir)
    return workdir, config


def test_jsonl_has_the_expected_keys_at_the_log_steps(run):
    workdir, config = run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    schedule = make_schedule(config.train)
    for row in rows:
        assert set(row) == KEYS | {"mfu"}
        assert np.isfinite(row["loss"]) and row["grad_norm"] > 0
        np.testing.assert_allclose(row["learning_rate"], float(schedule(row["step"] - 1)), rtol=1e-6)
        assert row["images_per_sec"] == pytest.approx(row["steps_per_sec"] * config.train.batch_size)
        assert 0 < row["mfu"] < 1


def test_tensorboard_events_hold_the_same_values(run):
    workdir, _ = run
    rows = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    scalars = read_scalars(workdir / "tensorboard")
    assert set(scalars) == {f"train/{k}" for k in KEYS - {"step"}} | {"train/mfu"}
    for tag, by_step in scalars.items():
        assert sorted(by_step) == [2, 4]
        for step, value in by_step.items():
            np.testing.assert_allclose(value, rows[step][tag.split("/", 1)[1]], rtol=1e-6)


def test_resume_prints_and_keeps_each_step_once(tmp_path, capsys):
    # tiny_config's constant schedule: the cosine one bakes train.steps into the step program, so resuming
    # `run` with more steps would compile another.
    config = tiny_config(steps=4)
    train_and_evaluate(config, tmp_path)
    capsys.readouterr()
    config.train.steps = 6
    train_and_evaluate(config, tmp_path)
    assert "resumed from" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert sorted(read_scalars(tmp_path / "tensorboard")["train/loss"]) == [2, 4, 6]


def test_a_resumed_writer_drops_the_steps_after_the_checkpoint(tmp_path):
    writer = metrics_lib.MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, {"loss": step})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    writer = metrics_lib.MetricsWriter(tmp_path, resume_step=3)  # the run died after a checkpoint at 3
    writer.write(4, {"loss": 40.0})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = metrics_lib.MetricsWriter(tmp_path)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_step_scalars_pass_learned_variance_terms_and_mfu_only_with_a_peak():
    step_metrics = {"loss": 1.0, "mse": 0.75, "vb": 0.25, "grad_norm": 2.0}
    off = metrics_lib.step_scalars(step_metrics, steps=4, seconds=2.0, batch_size=8, learning_rate=1e-3,
                                   step_flops=1e9)
    assert off == {**step_metrics, "learning_rate": 1e-3, "steps_per_sec": 2.0, "images_per_sec": 16.0}
    on = metrics_lib.step_scalars(step_metrics, steps=4, seconds=2.0, batch_size=8, learning_rate=1e-3,
                                  step_flops=1e9, peak_flops=1e10)
    assert on["mfu"] == pytest.approx(0.2)  # 1e9 FLOPs x 2 steps/s of 1e10 FLOP/s


def test_compiled_flops_counts_a_matmul():
    x = jnp.ones((32, 64), jnp.float32)
    w = jnp.ones((64, 16), jnp.float32)
    assert metrics_lib.compiled_flops(jax.jit(jnp.dot), x, w) == pytest.approx(2 * 32 * 64 * 16, rel=0.01)
