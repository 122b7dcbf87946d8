"""Checkpoints: checksums catch silent corruption, bad steps are skipped with one line, --step resumes an
older step, config changes are checked on resume, a full disk stops the run with the last step intact,
milestones outlive keep-N, a preempted run saves and resumes exactly, and a state saved on an fsdp mesh of 8
devices restores bit for bit onto 4 data-parallel devices."""
from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffax import compilation
from diffax.train import checkpoint, resume
from diffax.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY_FLAGS as TINY_MODEL_FLAGS, tiny_config  # noqa: E402

# The whole tiny config of tests/test_train.py as train.py overrides.
TINY_FLAGS = [*TINY_MODEL_FLAGS, "--config.train.log_every=2", "--config.train.checkpoint_every=3",
              "--config.train.sample_every=0", "--config.sample.steps=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of 6 steps with checkpoints at steps 3 and 6."""
    path = tmp_path_factory.mktemp("trained")
    train_and_evaluate(tiny_config(steps=6), path)
    return path


def _copy(trained: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def _raw(workdir: Path, step: int, item: str) -> list[np.ndarray]:
    """The leaves of one saved item as Orbax alone reads them: no checksums."""
    manager = checkpoint.make_manager(workdir, read_only=True)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                         sharding=checkpoint.replicated_everywhere()),
                          manager.item_metadata(step)[item])
    restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    return [np.asarray(x) for x in jax.tree.leaves(restored[item])]


def _raw_ema(workdir: Path, step: int) -> list[np.ndarray]:
    """The EMA params as Orbax alone reads them."""
    return _raw(workdir, step, "ema_params")


def _largest_array_file(workdir: Path, step: int, item: str = "ema_params") -> Path:
    """The largest OCDBT data file of `item` that a read of it needs. OCDBT keeps the files of superseded
    writes beside the live ones, and which file is largest varies from run to run: each candidate is moved
    aside in turn until Orbax's own read of the item fails without it."""
    files = (workdir / "checkpoints" / str(step) / item / "ocdbt.process_0" / "d").iterdir()
    for path in sorted(files, key=lambda p: p.stat().st_size, reverse=True):
        aside = path.with_name(path.name + ".aside")
        path.rename(aside)
        try:
            _raw(workdir, step, item)
        except Exception:  # noqa: BLE001 - Orbax raises bare Exceptions for missing chunks
            return path
        finally:
            aside.rename(path)
    raise AssertionError(f"no data file of {workdir}/checkpoints/{step}/{item} is read")


def _our_lines(stderr: str) -> list[str]:
    """stderr without absl's own warning lines (W1126 12:00:00.000 ... orbax: 'directory is read only')."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(("W", "I"))]


def test_checksums_are_exact_and_sharding_independent():
    x = np.random.default_rng(0).standard_normal((8, 6, 4)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("d",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    whole = checkpoint.checksums({"x": x, "i": np.arange(5, dtype=np.int8), "h": x.astype(jax.numpy.bfloat16)})
    assert checkpoint.checksums({"x": sharded})["x"] == whole["x"]
    y = x.copy()
    y[3, 2, 1] = np.nextafter(y[3, 2, 1], np.float32(np.inf))  # one bit of one value
    assert checkpoint.checksums({"x": y})["x"] != whole["x"]
    assert checkpoint.checksums({"x": x[::-1]})["x"] != whole["x"]  # the same values at other positions


def _dtypes_tree(sharding) -> dict:
    """Small leaves of every dtype a train state holds, placed with `sharding`."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    leaves = {"f32": x, "bf16": x.astype(jax.numpy.bfloat16), "f16": x.astype(np.float16),
              "i8": (x * 50).astype(np.int8), "u8": (x * 50).astype(np.uint8), "i32": (x * 1e6).astype(np.int32),
              "u32": (x * 1e6).astype(np.uint32), "bool": x > 0, "scalar": np.int32(7)}
    whole = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    tree = {k: jax.device_put(v, sharding if np.ndim(v) else whole) for k, v in leaves.items()}
    return {**tree, "key": jax.random.key(3)}


def test_small_leaves_are_checksummed_on_the_host_with_the_same_sums(monkeypatch):
    """Small leaves this process holds are summed in numpy, compiling nothing; the sums equal the jitted
    checksum's (forced by a threshold below every leaf) for every dtype, sharded or replicated."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("d",))
    for spec in (jax.sharding.PartitionSpec("d"), jax.sharding.PartitionSpec()):
        tree = _dtypes_tree(jax.sharding.NamedSharding(mesh, spec))
        with compilation.compile_seconds() as seconds:
            host = checkpoint.checksums(tree)
        assert seconds["compile"] == 0.0, spec
        monkeypatch.setattr(checkpoint, "HOST_CHECKSUM_BYTES", -1)
        assert checkpoint.checksums(tree) == host, spec
        monkeypatch.undo()


def test_small_replicated_arrays_save_without_slice_programs(tmp_path):
    """A replicated state of small leaves on 8 devices is written by one replica: the save compiles nothing
    (Orbax's replica-parallel default compiled a slice program per leaf shape and offset: 192 for
    tiny_config's state) and reads back exactly, also where a large leaf is still split over the replicas."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("d",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = np.random.default_rng(0)
    small = {f"w{i}": jax.device_put(rng.standard_normal((16, 8 + i)).astype(np.float32), replicated)
             for i in range(6)}
    state = {"step": jax.device_put(np.int32(1), replicated), "params": small, "opt_state": (),
             "skipped": jax.device_put(np.int32(0), replicated)}
    manager = checkpoint.make_manager(tmp_path)
    with compilation.compile_seconds() as seconds:
        manager.save(1, args=ocp.args.Composite(train_state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    assert seconds["compile"] == 0.0
    large = jax.device_put(rng.standard_normal((1024, 2048)).astype(np.float32), replicated)  # 1 MiB slices
    bigger = {**state, "params": {**small, "large": large}}
    manager.save(2, args=ocp.args.Composite(train_state=ocp.args.StandardSave(bigger)))
    manager.wait_until_finished()
    for step, tree in ((1, state), (2, bigger)):
        want, got = jax.tree.leaves(jax.device_get(tree)), _raw(tmp_path, step, "train_state")
        assert len(got) == len(want)
        for a, b in zip(want, got):
            np.testing.assert_array_equal(b, a)


def test_flipped_bytes_are_detected_and_sample_py_uses_the_previous_step(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    before = _raw_ema(workdir, 6)
    target = _largest_array_file(workdir, 6)
    original = target.read_bytes()
    # OCDBT files hold bytes no array reads, and zstd-compressed chunks whose damage zstd itself reports:
    # find 16 bytes whose flip Orbax reads back silently as other values.
    for fraction in np.linspace(0.02, 0.98, 49):
        data = bytearray(original)
        start = int(len(data) * fraction)
        data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
        target.write_bytes(bytes(data))
        try:
            after = _raw_ema(workdir, 6)  # Orbax reads the flipped bytes without complaint...
        except Exception:  # ...or these bytes were compressed, and zstd saw the damage (Orbax raises it as a
            continue         # ValueError or, on some read paths, a bare Exception): try others
        if any(not np.array_equal(a, b) for a, b in zip(before, after)):
            break
    else:
        pytest.fail("no flip changed what Orbax reads silently")

    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={workdir}", "--steps=2",
                             "--num_samples=2", f"--out={tmp_path / 's.npz'}"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = _our_lines(result.stderr)  # ...but the checksums do not match: one line, then the fallback
    assert len(lines) == 2, result.stderr
    assert f"{workdir / 'checkpoints' / '6'}: array ema_params/" in lines[0]
    assert "does not match its checksum" in lines[0]
    assert "using checkpoint step 3" in lines[1]
    assert "from step 3" in result.stdout
    assert (workdir / "checkpoints" / "6").is_dir()  # sampling never moves or deletes anything


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:16])


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, np.uint8).tobytes())


@pytest.mark.parametrize("damage, item", [
    ("truncate", "ema_params"), ("delete", "ema_params"), ("garbage", "ema_params"),
    ("garbage manifest", "ema_params"), ("garbage config", "config")])
def test_unreadable_latest_step_falls_back_in_one_line(trained, tmp_path, capfd, damage, item):
    workdir = _copy(trained, tmp_path)
    step6 = workdir / "checkpoints" / "6"
    if damage == "garbage manifest":
        _garbage(step6 / "ema_params" / "manifest.ocdbt")
    elif damage == "garbage config":
        (step6 / "config" / "metadata").write_text("{not json")
    else:
        target = _largest_array_file(workdir, 6)
        {"truncate": _truncate, "delete": Path.unlink, "garbage": _garbage}[damage](target)
    capfd.readouterr()
    config, params, step = checkpoint.restore_for_sampling(workdir)
    err = capfd.readouterr().err
    assert step == 3
    assert "Traceback" not in err and "Event loop is closed" not in err
    lines = _our_lines(err)
    assert len(lines) == 2, err
    assert lines[0].startswith(f"warning: skipping corrupt checkpoint {step6}: ") and item in lines[0], err
    with pytest.raises(checkpoint.CorruptCheckpointError, match=f"{step6}: .*{item}"):
        checkpoint.restore_for_sampling(workdir, step=6)  # asked for by number: an error, no fallback


def test_read_coroutines_left_pending_are_collected_quietly(monkeypatch):
    """When one read of a step fails, Orbax leaves the others' coroutines pending; collected later, each is
    closed and Orbax's `except BaseException` turns that close into an exception of its own. The restore's
    hook drops exactly those (seen at random tests of a full run as 'Exception ignored in: <coroutine
    object _read_array_index_and_device_put>') and passes any other unraisable error on."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._ignore_closed_loop_callbacks()

    class Pending:  # awaited forever: the coroutine stays suspended until it is collected
        def __await__(self):
            yield

    source = ("async def read(pending):\n    try:\n        await pending\n    except BaseException as e:\n"
              "        raise Exception('Encountered error while reading array index') from e\n")
    for filename in ("/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "/elsewhere/ours.py"):
        namespace = {}
        exec(compile(source, filename, "exec"), namespace)
        coroutine = namespace["read"](Pending())
        coroutine.send(None)
        del coroutine
        gc.collect()
    assert [u.object.cr_code.co_filename for u in seen] == ["/elsewhere/ours.py"]
    assert isinstance(seen[0].exc_value.__cause__, GeneratorExit)


def test_resumed_training_skips_a_corrupt_step_and_moves_it_aside(trained, tmp_path, capfd):
    workdir = _copy(trained, tmp_path)
    _garbage(_largest_array_file(workdir, 6, "train_state"))
    capfd.readouterr()
    train_and_evaluate(tiny_config(steps=6), workdir)
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert f"skipping corrupt checkpoint {workdir / 'checkpoints' / '6'}: cannot read train_state" in err
    assert f"step 3; corrupt steps moved to {workdir / 'checkpoints' / 'corrupt' / '6'}" in err
    # The corrupt step is kept, out of Orbax's sight; the run trained 3 -> 6 again and saved a good step 6.
    assert (workdir / "checkpoints" / "corrupt" / "6" / "train_state").is_dir()
    manager = checkpoint.make_manager(workdir, read_only=True)
    assert sorted(manager.all_steps()) == [3, 6]
    np.testing.assert_array_equal(_raw_ema(workdir, 6)[0], _raw_ema(trained, 6)[0])  # resuming is exact


def test_train_step_flag_resumes_an_older_step(trained, tmp_path, capfd):
    workdir = _copy(trained, tmp_path)
    capfd.readouterr()
    train_and_evaluate(tiny_config(steps=6), workdir, step=3)
    err = capfd.readouterr().err
    assert f"later steps moved to {workdir / 'checkpoints' / 'superseded' / '6'}" in err
    assert (workdir / "checkpoints" / "superseded" / "6" / "ema_params").is_dir()
    assert sorted(checkpoint.make_manager(workdir, read_only=True).all_steps()) == [3, 6]  # 6 saved anew

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}",
                             f"--workdir={workdir}", "--step=99", *TINY_FLAGS, "--config.train.steps=6"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {workdir / 'checkpoints'}: no checkpoint at step 99; have [3, 6]")


@pytest.mark.parametrize("key, value, message", [
    ("model.block_out_channels", (8, 32), "model.block_out_channels [8, 16] -> [8, 32]"),
    ("diffusion.prediction_type", "v_prediction", 'diffusion.prediction_type "epsilon" -> "v_prediction"'),
    ("train.batch_size", 32, "train.batch_size 16 -> 32"),
    ("data.image_size", 8, "data.image_size 16 -> 8"),
    ("model.name", "DiTTransformer2DModel", 'model.name "UNet2DModel" -> "DiTTransformer2DModel"'),
])
def test_a_config_change_that_alters_the_checkpoint_is_an_error(trained, key, value, message):
    config = tiny_config(steps=6)
    block, name = key.split(".")
    config[block][name] = value
    saved = checkpoint.read_config(checkpoint.make_manager(trained, read_only=True), 6)
    with pytest.raises(resume.ConfigChangeError, match="cannot resume .*6 with a changed config: " + (
            message.replace("[", r"\[").replace("]", r"\]"))):
        resume.check_config(saved, config, trained / "checkpoints" / "6")


def test_resuming_with_a_changed_model_names_the_key(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    config = tiny_config(steps=9)
    config.model.norm_num_groups = 2
    with pytest.raises(resume.ConfigChangeError, match="model.norm_num_groups 4 -> 2"):
        train_and_evaluate(config, workdir)
    assert not (workdir / "checkpoints" / "9").exists()


def test_allowed_config_changes_are_recorded_not_written_over(trained, tmp_path, capfd):
    workdir = _copy(trained, tmp_path)
    config = tiny_config(steps=9)
    config.train.learning_rate = 1e-3
    config.diffusion.snr_gamma = 0.0
    capfd.readouterr()
    train_and_evaluate(config, workdir)
    err = capfd.readouterr().err
    assert ("config changed since step 6: diffusion.snr_gamma 5.0 -> 0.0; train.learning_rate 0.002 -> 0.001; "
            "train.steps 6 -> 9") in err
    history = [json.loads(line) for line in (workdir / resume.HISTORY_FILE).read_text().splitlines()]
    assert [record["step"] for record in history] == [0, 6]
    first = history[0]["config"]  # the run's first config, whole
    assert first["train"]["learning_rate"] == 0.002 and first["train"]["steps"] == 6
    assert history[1]["changed"] == {"diffusion.snr_gamma": {"old": 5.0, "new": 0.0},
                                     "train.learning_rate": {"old": 0.002, "new": 0.001},
                                     "train.steps": {"old": 6, "new": 9}}
    manager = checkpoint.make_manager(workdir, read_only=True)
    assert checkpoint.read_config(manager, 9).train.learning_rate == 1e-3  # the config in force from step 6
    assert checkpoint.read_config(manager, 6).train.learning_rate == 0.002


# train.py whose disk fills up after its first checkpoint: every later write of a file past 4 KiB fails in the
# kernel (RLIMIT_FSIZE: EFBIG, as ENOSPC would), inside TensorStore's and Orbax's real write path. stderr is a
# pipe, which the limit does not touch.
FULL_DISK = """
import resource, runpy, signal, sys
from diffax.train import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing the process
save = checkpoint.save
def save_then_fill(manager, *args, **kwargs):
    save(manager, *args, **kwargs)
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY:
        manager.wait_until_finished()
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
checkpoint.save = save_then_fill
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def test_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}",
         f"--workdir={workdir}", *TINY_FLAGS, "--config.train.steps=6", "--config.train.log_every=100"],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    lines = _our_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: could not write a checkpoint to {workdir / 'checkpoints'} ")
    assert "File too large" in lines[0] and "the steps already saved are intact: [3]" in lines[0]
    manager = checkpoint.make_manager(workdir, read_only=True)
    assert sorted(manager.all_steps()) == [3]  # the half-written step 6 is a temporary folder Orbax ignores
    assert checkpoint.restore_for_sampling(workdir)[2] == 3  # and step 3 reads back, checksums and all


def test_keep_every_outlives_keep_n(tmp_path):
    """keep_checkpoints=2, keep_every=3, saves at steps 1..7: the last two and the multiples of 3 stay."""
    import jax.numpy as jnp
    from diffax.train.config import base_config
    from diffax.train.state import TrainState
    manager = checkpoint.make_manager(tmp_path, max_to_keep=2, keep_every=3)
    for step in range(1, 8):
        state = TrainState(step=jnp.int32(step), params={"w": jnp.full((4,), step, jnp.float32)},
                           ema_params={"w": jnp.zeros((4,), jnp.float32)}, opt_state=(), skipped=jnp.int32(0))
        checkpoint.save(manager, state, base_config(), None)
    checkpoint.finish(manager)
    assert sorted(checkpoint.make_manager(tmp_path, read_only=True).all_steps()) == [3, 6, 7]


@pytest.mark.slow  # subprocesses / whole runs: `make test-slow`
def test_preempted_run_saves_at_the_next_step_and_resumes_exactly(trained, tmp_path, monkeypatch, capfd):
    """SIGTERM during step 2's save: the run finishes step 3, saves it, says so and returns; resumed, it
    ends with the uninterrupted run's weights (same devices and programs: rounding-free, compared at 1e-6)."""
    from diffax.train import loop
    save = checkpoint.save

    def save_then_preempt(manager, state, *args):
        save(manager, state, *args)
        if int(state.step) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_config(steps=6)
    config.train.checkpoint_every = 2
    monkeypatch.setattr(loop.checkpoint, "save", save_then_preempt)
    handler = signal.getsignal(signal.SIGTERM)
    state = train_and_evaluate(config, tmp_path)
    assert int(state.step) == 3
    assert "preempted: stopped after step 3, the latest checkpoint is step 3" in capfd.readouterr().err
    monkeypatch.setattr(loop.checkpoint, "save", save)
    assert signal.getsignal(signal.SIGTERM) == handler  # put back
    train_and_evaluate(config, tmp_path)
    for a, b in zip(_raw_ema(tmp_path, 6), _raw_ema(trained, 6)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


RESTORE_ON_4 = """
import sys, numpy as np, jax
sys.path.insert(0, {tests!r})
from test_train import tiny_config
from diffax import parallel
from diffax.models import build_model
from diffax.train import checkpoint
from diffax.train.loop import create_train_state
from diffax.train.state import make_optimizer
assert jax.device_count() == 4
config = tiny_config()
model, tx = build_model(config.model), make_optimizer(config.train)
mesh = parallel.make_mesh({{"data": -1}})  # data-parallel: every weight replicated
state, shardings = create_train_state(model, tx, mesh, jax.random.key(9))
abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
manager = checkpoint.make_manager({workdir!r}, read_only=True)
restored = checkpoint.restore_train_state(manager, abstract, None, 1)
assert all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 4
           for x in jax.tree.leaves(restored.params))
np.savez({out!r}, *[np.asarray(x) for x in jax.tree.leaves(restored)])
"""


@pytest.mark.slow  # subprocesses / whole runs: `make test-slow`
def test_fsdp_checkpoint_restores_bit_exact_on_4_data_parallel_devices(tmp_path):
    """Saved from (data 1, fsdp 8, tensor 1) after one step; restored in a process with 4 devices on a
    data-parallel mesh: every leaf of the state (params, EMA, Adam moments, step) is bit-identical."""
    from diffax import parallel
    from diffax.models import build_model
    from diffax.train.loop import create_train_state, jit_train_step, make_objective, model_batch
    from diffax.train.state import make_optimizer
    config = tiny_config()
    model, tx = build_model(config.model), make_optimizer(config.train)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    state, shardings = create_train_state(model, tx, mesh, jax.random.key(0))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(state.params))
    step = jit_train_step(model, tx, make_objective(config, model), mesh, parallel.DEFAULT_RULES, shardings,
                          config.train)
    rng = np.random.default_rng(0)
    batch = model_batch({"image": rng.uniform(-1, 1, (16, 16, 16, 1)).astype(np.float32),
                         "label": rng.integers(0, 10, (16,)).astype(np.int32)}, model)
    state, _ = step(state, parallel.shard_batch(batch, mesh), jax.random.key(1))
    manager = checkpoint.make_manager(tmp_path)
    checkpoint.save(manager, state, config, None)
    checkpoint.finish(manager)

    out = tmp_path / "restored.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    script = RESTORE_ON_4.format(tests=str(Path(__file__).parent), workdir=str(tmp_path), out=str(out))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = np.load(out)
    leaves = jax.tree.leaves(jax.device_get(state))
    assert len(restored.files) == len(leaves)
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(restored[f"arr_{i}"], np.asarray(leaf))
