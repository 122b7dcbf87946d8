"""Training: sharded step == single-device step, exact resume after a kill, non-finite steps skipped and
counted, the stop after too many, bad config errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from diffax import parallel
from diffax.models import build_model
from diffax.train import checkpoint
from diffax.train.config import validate_config
from diffax.train.loop import (NonFiniteLossError, create_train_state, make_objective, model_batch,
                               train_and_evaluate)
from diffax.train.state import make_optimizer
from diffax.train.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs.digits import get_config  # noqa: E402


def tiny_config(steps: int = 6) -> ml_collections.ConfigDict:
    """The digits recipe shrunk until a step compiles and runs in well under a second."""
    c = get_config()
    c.model.block_out_channels = (8, 16)
    c.model.down_block_types = ("DownBlock2D", "AttnDownBlock2D")
    c.model.up_block_types = ("AttnUpBlock2D", "UpBlock2D")
    c.model.attention_head_dim = 8
    c.model.norm_num_groups = 4
    c.train.steps = steps
    c.train.batch_size = 16
    c.train.warmup_steps = 2
    # Constant after warm-up: the cosine schedule bakes `train.steps` into the step's program, so each run
    # length compiled its own; now runs of any length (here and in train.py flags) share one cached program.
    c.train.lr_schedule = "constant"
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.sample_every = 0
    c.sample.steps = 3
    return c


# tiny_config's model and optimizer as train.py flags (the tests that run train.py add their steps, logging
# and checkpoint flags): the same programs as an in-process run, so the compilation cache serves both.
TINY_FLAGS = ["--config.model.block_out_channels=(8, 16)",
              "--config.model.down_block_types=('DownBlock2D', 'AttnDownBlock2D')",
              "--config.model.up_block_types=('AttnUpBlock2D', 'UpBlock2D')",
              "--config.model.attention_head_dim=8", "--config.model.norm_num_groups=4",
              "--config.train.batch_size=16", "--config.train.warmup_steps=2", "--config.train.lr_schedule=constant"]


def _params(workdir: Path) -> list[np.ndarray]:
    manager = checkpoint.make_manager(workdir, read_only=True)
    step = manager.latest_step()
    import orbax.checkpoint as ocp
    restored = manager.restore(step, args=ocp.args.Composite(train_state=ocp.args.StandardRestore()))
    return [np.asarray(x) for x in jax.tree.leaves(restored["train_state"]["params"])]


# tests/test_mesh_step.py checks the step on data-parallel and FSDP x tensor meshes against one device for DiT
# and this U-Net (on (2, 2, 2)) by default; this data-parallel-only check of tiny_config's own step (about 45 s
# of compiles on 2 cores) runs with `-m slow`.
@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
    config = tiny_config()
    spec = build_model(config.model)
    tx = make_optimizer(config.train)
    step = make_train_step(spec, tx, make_objective(config, spec))
    rng = np.random.default_rng(0)
    batch = model_batch({"image": rng.uniform(-1, 1, (16, 16, 16, 1)).astype(np.float32),
                         "label": rng.integers(0, 10, (16,)).astype(np.int32)}, spec)
    assert set(batch["cond"]) == {"class_labels"}
    key = jax.random.key(1)

    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = parallel.make_mesh({"data": -1}, devices)
        state, shardings = create_train_state(spec, tx, mesh, jax.random.key(0))
        fn = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
                     out_shardings=(shardings, parallel.replicated(mesh)))
        sharded = parallel.shard_batch(batch, mesh)
        assert len(sharded["image"].sharding.device_set) == len(devices)
        state, metrics = fn(state, sharded, key)
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    (p1, l1), (p8, l8) = results
    # Only the order of the batch-mean reduction differs between layouts: fp32 rounding, ~1e-7 relative.
    assert abs(l1 - l8) <= 1e-5 * abs(l1)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """A run SIGKILLed after its step-3 checkpoint and resumed ends with the uninterrupted run's weights.

    Both runs use the same 8 simulated devices (the child inherits XLA_FLAGS), so they are bit-identical
    when resuming is exact; the tolerance only absorbs nothing-but-rounding."""
    config = tiny_config(steps=12)
    overrides = [*TINY_FLAGS, "--config.train.steps=12", "--config.train.checkpoint_every=3",
                 "--config.train.log_every=1", "--config.train.sample_every=0"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}",
                             f"--workdir={killed}", *overrides], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "3" / "commit_success.txt").exists() and not (
                killed / "checkpoints" / "3" / "_CHECKPOINT_METADATA").exists():
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # The killed run left step 3 (maybe more, maybe one half-written save that Orbax ignores).
    manager = checkpoint.make_manager(killed, read_only=True)
    assert 3 <= manager.latest_step() < 12, "the kill must land mid-run"
    train_and_evaluate(config, killed)
    whole = tmp_path / "whole"
    train_and_evaluate(tiny_config(steps=12), whole)
    for a, b in zip(_params(killed), _params(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(steps=40)
    sane_learning_rate = config.train.learning_rate
    # Adam moves every weight by ~lr whatever the gradient's scale (clipping included): the loss overflows
    # within steps.
    config.train.learning_rate = 1e6
    config.train.checkpoint_every = 1
    config.train.log_every = 1
    config.train.warmup_steps = 2  # step 1 updates with lr 0: its weights are the good ones
    config.train.max_nonfinite_skips = 0  # stop at the first non-finite step
    with pytest.raises(NonFiniteLossError, match="The last good checkpoint is step") as stop:
        train_and_evaluate(config, tmp_path)
    manager = checkpoint.make_manager(tmp_path, read_only=True)
    last = manager.latest_step()
    assert f"is step {last} in" in str(stop.value)
    for leaf in _params(tmp_path):
        assert np.all(np.isfinite(leaf)), f"checkpoint {last} holds non-finite weights"

    # What the error advises works: the last checkpoint resumes with a sane learning rate and trains on with a
    # finite loss (checked every step). Checking only the loss before each update used to save a state whose
    # own loss was already NaN, and resuming it failed at once.
    config.train.learning_rate = sane_learning_rate  # tiny_config's own: its cached step program
    config.train.steps = last + 4
    state = train_and_evaluate(config, tmp_path)
    assert int(state.step) == last + 4
    assert all(np.all(np.isfinite(leaf)) for leaf in _params(tmp_path))


def _poison_batches(monkeypatch, steps: set[int]) -> None:
    """The loop's batches of the given (1-based) steps get a NaN pixel."""
    from diffax.train import loop
    model_batch_of, count = loop.model_batch, [0]

    def poisoned(batch, model):
        out = model_batch_of(batch, model)
        count[0] += 1
        if count[0] in steps:
            out["image"] = np.array(out["image"])
            out["image"][0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(loop, "model_batch", poisoned)


def test_a_poisoned_batch_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, capfd):
    """Step 4's batch holds a NaN: its update is skipped (one line says so), counted in the state and the
    metrics, and the run ends at step 6 with finite weights."""
    _poison_batches(monkeypatch, {4})
    config = tiny_config(steps=6)
    config.train.log_every = 1
    state = train_and_evaluate(config, tmp_path)
    assert int(state.step) == 6 and int(state.skipped) == 1
    assert ("step 4: 1 update(s) since step 3 skipped for a non-finite loss or gradient (1 in this run, "
            "train.max_nonfinite_skips=10)") in capfd.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert np.isnan(rows[3]["loss"]) and np.isfinite(rows[4]["loss"])
    assert all(np.all(np.isfinite(leaf)) for leaf in _params(tmp_path))


def test_too_many_skips_stop_the_run_at_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Every batch from step 3 on is bad and 2 skips are allowed: the third stops the run, naming the last
    checkpoint (step 2: a state whose loss on its batch is not finite is not saved)."""
    _poison_batches(monkeypatch, set(range(3, 20)))
    config = tiny_config(steps=12)
    config.train.max_nonfinite_skips = 2
    config.train.log_every = config.train.checkpoint_every = 1
    with pytest.raises(NonFiniteLossError, match=r"3 updates were skipped for a non-finite loss or gradient by "
                                                 r"step 5, more than train.max_nonfinite_skips=2 .*The last good "
                                                 r"checkpoint is step 2 in"):
        train_and_evaluate(config, tmp_path)
    assert checkpoint.make_manager(tmp_path, read_only=True).latest_step() == 2


@pytest.mark.parametrize("block, key, value, message", [
    (None, "trian", 3, "unknown config key 'trian'"),
    ("train", "stepz", 3, "unknown config key 'train.stepz'"),
    ("train", "steps", "many", "'train.steps' must be int"),
    ("data", "image_size", 1.5, "'data.image_size' must be int"),
])
def test_bad_config_is_named(block, key, value, message):
    config = tiny_config()
    target = config if block is None else config[block]
    with target.unlocked(), target.ignore_type():
        target[key] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_bad_override_on_command_line_is_named(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}",
                             f"--workdir={tmp_path}", "--config.train.stepz=3"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert "stepz" in result.stderr


def test_model_data_mismatch_is_named(tmp_path):
    config = tiny_config()
    config.data.image_size = 32
    with pytest.raises(ValueError, match="data images are .*32.* model takes"):
        train_and_evaluate(config, tmp_path)


def test_label_dropout_replaces_whole_examples_of_any_cond_pytree():
    """drop_cond works leaf by leaf on any pytree (class labels, text embeddings, nested dicts) with one draw
    per example, so an example keeps or loses all of its conditioning together."""
    from diffax.train.step import drop_cond

    b = 512
    cond = {"class_labels": np.arange(1, b + 1, dtype=np.int32),
            "encoder_hidden_states": np.ones((b, 3, 4), np.float32),
            "added_cond_kwargs": {"text_embeds": np.ones((b, 5), np.float32)}}
    null = jax.tree.map(np.zeros_like, cond)
    out = jax.device_get(drop_cond(cond, null, jax.random.key(0), 0.25))
    dropped = out["class_labels"] == 0  # [B]
    assert 0.15 < dropped.mean() < 0.35
    for leaf in (out["encoder_hidden_states"], out["added_cond_kwargs"]["text_embeds"]):
        per_example = leaf.reshape(b, -1)
        assert np.all(per_example[dropped] == 0) and np.all(per_example[~dropped] == 1)
    kept = jax.device_get(drop_cond(cond, null, jax.random.key(0), 0.0))
    np.testing.assert_array_equal(kept["class_labels"], cond["class_labels"])


def test_train_step_drops_conditioning_through_the_models_null_cond():
    """With label_dropout 1 the loss is the loss of the model's null conditioning (here the null class)."""
    import dataclasses

    from diffax.models import init_params
    from diffax.train.step import diffusion_loss

    config = tiny_config()
    model = build_model(config.model)
    objective = make_objective(config, model)
    params = init_params(model.config, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = model_batch({"image": rng.uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32),
                         "label": np.array([1, 2, 3, 4], np.int32)}, model)
    nulled = {**batch, "cond": model.config.null_cond(batch["cond"])}
    compiled = jax.jit(lambda obj, b: diffusion_loss(model, params, obj, b, jax.random.key(1))[0],
                       static_argnums=0)
    loss = lambda obj, b: float(compiled(obj, b))  # noqa: E731
    always = dataclasses.replace(objective, label_dropout=1.0)
    never = dataclasses.replace(objective, label_dropout=0.0)
    assert loss(always, batch) == pytest.approx(loss(never, nulled), rel=1e-6)
    assert loss(never, batch) != pytest.approx(loss(never, nulled), rel=1e-6)  # the labels do matter


def test_a_run_from_scratch_exports_as_a_diffusers_model_folder(tmp_path, capsys):
    """pipeline_export writes a from-scratch run's EMA weights as the model's diffusers folder, which diffusers
    loads and runs to diffax's output; `python -m diffax.convert` on a workdir points at that command."""
    import torch
    from diffusers import UNet2DModel

    from diffax.convert.__main__ import main as convert_main
    from diffax.train.checkpoint import restore_for_sampling
    from diffax.train.pipeline_export import export_pipeline

    config = tiny_config(steps=2)
    config.train.sample_every = 0
    train_and_evaluate(config, tmp_path / "run")
    out = export_pipeline(tmp_path / "run", tmp_path / "export")
    _, ema, _ = restore_for_sampling(tmp_path / "run")
    model = build_model(config.model)
    x = np.random.default_rng(0).normal(size=(2, *model.config.sample_shape)).astype(np.float32)  # [B, H, W, C]
    labels = np.array([3, 7])
    ours = np.asarray(model.apply({"params": ema}, x, np.array([10, 900]), class_labels=labels))
    with torch.no_grad():
        theirs = UNet2DModel.from_pretrained(out)(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([10, 900]),
                                                  class_labels=torch.from_numpy(labels)).sample
    np.testing.assert_allclose(theirs.permute(0, 2, 3, 1).numpy(), ours, atol=1e-4 * np.abs(ours).max())
    assert convert_main([str(tmp_path / "run"), str(tmp_path / "other")]) == 1 and not (tmp_path / "other").exists()
    assert "is a diffax training workdir: export it with `python -m diffax.train.pipeline_export" in capsys.readouterr().err
