"""Orbax checkpoints of a run: train state, EMA params, the config, the data iterator position, checksums.

Layout of `workdir/checkpoints/<step>/`:
  train_state/  {step, params, opt_state, skipped}  what resuming needs
  ema_params/   the EMA weights                  all that sampling needs (restored alone)
  config/       the run's ConfigDict as JSON     rebuilds the model without the original config file
  data/         grain iterator state per process the next batch after resuming
  integrity/    a checksum per array (JSON)      restore checks what it read against what was written
Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact; saves are asynchronous (training continues while they are written).

A step that cannot be read, or whose arrays do not match their checksums, raises `CorruptCheckpointError`
naming the step directory and the first bad item; `restore_for_sampling` then falls back to the newest
good step. Bad steps are never deleted here (`set_aside` moves them out of Orbax's sight).
"""
from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
INTEGRITY_VERSION = 1


class NoCheckpointError(FileNotFoundError):
    """A workdir holds no complete checkpoint, or not the step asked for."""


class CorruptCheckpointError(ValueError):
    """A checkpoint step cannot be read or does not match its checksums."""

    def __init__(self, step_dir: Path, what: str):
        super().__init__(f"{step_dir}: {what}")
        self.step_dir, self.what = step_dir, what


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, lost permissions); the steps saved before are intact."""


def first_line(error: BaseException) -> str:
    """The first line of the message of the exception at the root of `error`'s chain, with its type: what a
    one-line report can show (Orbax wraps TensorStore's precise error, which names the file and array)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 400:  # TensorStore's messages end with the operating system's reason
        text = f"{text[:200]} ... {text[-200:]}"
    return f"{type(error).__name__}: {text}"


# Orbax saves a replicated array "replica-parallel": each replica writes a slice, cut out by a jitted slice
# program compiled per leaf shape and offset. For a small leaf that is all cost: a train state of 8 replicas
# compiled over a thousand such programs at its first save. Arrays whose slice would be smaller than this are
# written whole by one replica; large ones still spread their writes over the replicas.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache
def _register_array_handler() -> None:
    """Orbax's jax.Array handler with `MIN_REPLICA_SLICE_BYTES` (Orbax's type handlers are process-wide; the
    stored format is the same, so any Orbax reads these checkpoints)."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
        override=True)


def make_manager(workdir: str | Path, *, max_to_keep: int = 3, keep_every: int = 0, read_only: bool = False,
                 enable_async: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager over `workdir/checkpoints` keeping the last `max_to_keep` steps, and also every
    step that is a multiple of `keep_every` (0: none) for good: the milestones of a long run."""
    _quiet_orbax_failures()
    _register_array_handler()
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep,
                                           keep_period=keep_every or None, create=not read_only,
                                           read_only=read_only, save_interval_steps=0 if read_only else 1,
                                           enable_async_checkpointing=enable_async,
                                           cleanup_tmp_directories=not read_only)
    item_handlers = {
        "train_state": ocp.StandardCheckpointHandler(),
        "ema_params": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "integrity": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options,
                                 item_handlers=item_handlers)


def step_dir(manager: ocp.CheckpointManager, step: int) -> Path:
    """The directory of a committed step."""
    return Path(manager.directory) / str(step)


# ---------------------------------------------------------------------------------------------------------
# Checksums. Each leaf's bits, as uint32 words, are hashed with their flat position and summed mod 2**32 in
# a jitted reduction on the devices that hold the array. Integer addition is exact and commutative, so the
# sum is the same for any sharding, device count or process count, and no large array is copied to the host.
# Each term is fmix32(word + position * golden ratio); fmix32 is a bijection, so changing any one word always
# changes the sum; moved or several changed words collide with chance about 2**-32.
# Leaves of at most `HOST_CHECKSUM_BYTES` that this process holds whole are summed in numpy instead, the same
# sum: a jitted checksum compiles one program per leaf shape, and a train state's biases and norms have many
# shapes (over 500 programs in the test suite, 65 ms each), while numpy hashes a MiB in under a millisecond.
HOST_CHECKSUM_BYTES = 1 << 20


# The unsigned type of a leaf's words by item size: 8- and 16-bit values are widened, 64-bit ones split in two.
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


def _fmix32(h: Any) -> Any:
    """MurmurHash3's finalizer on uint32 (jax or numpy arrays): a bijection that spreads every input bit over
    the output."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _terms(words: Any, index: Any) -> Any:
    """The summed terms, fmix32(word + flat position * golden ratio), of uint32 words (jax or numpy)."""
    return _fmix32(words + index * np.uint32(0x9E3779B9))


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (8- and 16-bit values widened, 64-bit values split in two)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    words = _words(x)
    if words.size < 2**32:
        index = jax.lax.iota(jnp.uint32, words.size).reshape(words.shape)  # the flat position
    else:  # the flat position mod 2**32, without a 64-bit iota
        index, stride = jnp.zeros(words.shape, jnp.uint32), 1
        for axis in reversed(range(words.ndim)):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
            stride *= words.shape[axis]
    return jnp.sum(_terms(words, index), dtype=jnp.uint32)


def _host_value(x: Any) -> np.ndarray | None:
    """A small leaf's value on the host when this process holds all of it (whole, or one full replica), else
    None. Decided from the leaf's global properties, so every process takes the same path for each leaf."""
    x = jnp.asarray(x)  # host leaves take the dtype a jitted checksum would see (64-bit ones narrowed)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.nbytes > HOST_CHECKSUM_BYTES:
        return None
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0)) if x.sharding.is_fully_replicated else None


def _host_checksum(x: np.ndarray) -> np.uint32:
    """`_leaf_checksum` of a host array in numpy (uint32 arithmetic wraps mod 2**32 as XLA's does)."""
    x = np.ascontiguousarray(x.astype(np.uint8) if x.dtype == np.bool_ else x).reshape(-1)
    words = x.view(_UNSIGNED[x.dtype.itemsize]).astype(np.uint32)  # 64-bit: low word first, as XLA splits them
    return _terms(words, np.arange(words.size, dtype=np.uint32)).sum(dtype=np.uint32)


@functools.cache
def _checksum_fn(replicated: jax.sharding.Sharding | None) -> Callable[[jax.Array], jax.Array]:
    """The jitted checksum of one array. One small program per shape, dtype and layout (jit's cache), which
    many leaves share (params, EMA and Adam moments alike): far quicker to compile than one program over
    the whole tree."""
    return jax.jit(_leaf_checksum, out_shardings=replicated)


def checksums(tree: Any) -> dict[str, str]:
    """{leaf path: 8 hex digits} of a pytree of (possibly sharded, multi-process) arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        return {}
    sharding = getattr(leaves[0][1], "sharding", None)
    replicated = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                  if isinstance(sharding, jax.sharding.NamedSharding) else None)
    checksum = _checksum_fn(replicated)
    # One at a time: on XLA:CPU, many small programs with collectives (the all-reduce of a sharded leaf's
    # sum) in flight at once can exhaust the thread pool before every device joins the rendezvous, a
    # deadlock that aborts the process after 40 s.
    sums = []
    for _, x in leaves:
        host = _host_value(x)
        sums.append(_host_checksum(host) if host is not None else jax.block_until_ready(checksum(x)))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): f"{int(s):08x}"
            for (path, _), s in zip(leaves, jax.device_get(sums))}


def _verify(directory: Path, item: str, tree: Any, saved: dict[str, str]) -> None:
    """Raise CorruptCheckpointError at the first leaf of `tree` whose checksum is not the saved one."""
    got = checksums(tree)
    for path in sorted(set(got) | set(saved)):
        if got.get(path) != saved.get(path):
            what = ("has no recorded checksum" if path not in saved else "is missing" if path not in got
                    else f"does not match its checksum (written {saved[path]}, read {got[path]})")
            raise CorruptCheckpointError(directory, f"array {item}/{path} {what}")


# ---------------------------------------------------------------------------------------------------------
# Saving.

def save(manager: ocp.CheckpointManager, state: Any, config: ml_collections.ConfigDict,
         data_iterator: Any | None) -> None:
    """Start an asynchronous save of `state` (a TrainState) at its step, with a checksum of every array.

    Raises CheckpointSaveError when this save, or the previous asynchronous one, cannot be written.
    """
    train_state = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
                   "skipped": state.skipped}
    integrity = {"version": INTEGRITY_VERSION, "train_state": checksums(train_state),
                 "ema_params": checksums(state.ema_params)}
    items = {
        "train_state": ocp.args.StandardSave(train_state),
        "ema_params": ocp.args.StandardSave(state.ema_params),
        "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        "integrity": ocp.args.JsonSave(integrity),
    }
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    step = int(jax.device_get(state.step))
    _writing(manager, step, lambda: manager.save(step, args=ocp.args.Composite(**items)))


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
    """Block until the asynchronous save in flight is on disk; CheckpointSaveError if it failed."""
    _writing(manager, None, manager.wait_until_finished)


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for the save in flight, then close the manager; CheckpointSaveError if the save failed (closing
    then re-raises the same failure, which is not reported twice)."""
    try:
        wait_until_saved(manager)
    except CheckpointSaveError:
        try:
            manager.close()
        except Exception:  # the same failed save, already in the error being raised
            pass
        raise
    _writing(manager, None, manager.close)


def _writing(manager: ocp.CheckpointManager, step: int | None, write: Callable[[], Any]) -> None:
    try:
        write()
    except Exception as e:  # Orbax and TensorStore raise many types; all mean the same thing here
        saved = [int(p.name) for p in Path(manager.directory).iterdir() if p.name.isdigit()]
        raise CheckpointSaveError(
            f"could not write a checkpoint{'' if step is None else f' at step {step}'} to {manager.directory} "
            f"({first_line(e)}); the steps already saved are intact: {sorted(saved)}. Free disk space and "
            f"re-run the same command to resume") from e


# ---------------------------------------------------------------------------------------------------------
# Restoring.

class _DropOrbaxThreadErrors(logging.Filter):
    """Orbax logs each failure of its background save threads with a traceback (and asyncio logs the same
    failure again for the tasks nobody awaited after it), then raises it from `save` /
    `wait_until_finished`, where `CheckpointSaveError` reports it in one line; drop those logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "/orbax/" in record.pathname or "exception was never retrieved" in str(record.msg):
            return False
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if "/orbax/" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


def _quiet_orbax_failures() -> None:
    """Install, once, the filters that keep a failed checkpoint read or write to our one-line report."""
    _ignore_closed_loop_callbacks()
    # The write coroutines a failed save abandoned, reported again at interpreter exit.
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    for logger in (logging.getLogger("absl"), logging.getLogger("asyncio")):
        if not any(isinstance(f, _DropOrbaxThreadErrors) for f in logger.filters):
            logger.addFilter(_DropOrbaxThreadErrors())


def _ignore_closed_loop_callbacks() -> None:
    """Silence what a failed Orbax read leaves behind in flight.

    When one of many concurrent reads fails, Orbax's `asyncio.run` returns and closes its loop while the
    other reads are still pending, and each reports later through `sys.unraisablehook`, hundreds of lines
    after the one-line report:
    - a TensorStore future finishing calls the closed loop: "RuntimeError: Event loop is closed";
    - an Orbax read coroutine collected while it waits is closed, and Orbax's `except BaseException` turns
      the GeneratorExit of that close into its own "Encountered error while reading array index" exception.
    Those and only those are dropped; the hook stays for the process's life because they arrive at any
    later time (the second at whichever garbage collection finds the coroutine).
    """
    previous = sys.unraisablehook
    if getattr(previous, "_diffax_closed_loop_filter", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's code object
        if code is not None and "/orbax/" in code.co_filename and isinstance(value.__cause__, GeneratorExit):
            return
        previous(unraisable)

    hook._diffax_closed_loop_filter = True
    sys.unraisablehook = hook


def _restore(manager: ocp.CheckpointManager, step: int, items: dict[str, Any]) -> dict[str, Any]:
    """manager.restore, with any failure to read turned into CorruptCheckpointError naming the item."""
    _ignore_closed_loop_callbacks()
    directory = step_dir(manager, step)
    missing = [name for name in items if not (directory / name).is_dir()]
    if missing:
        raise CorruptCheckpointError(directory, f"item {missing[0]}/ is missing")
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # TensorStore, Orbax, json and OS errors alike mean the files cannot be read
        item = next((name for name in items if f"/{step}/{name}" in str(e)), "/".join(items))
        raise CorruptCheckpointError(directory, f"cannot read {item}: {first_line(e)}") from e


def _read_together(directory: Path, read: Callable[[], Any]) -> Any:
    """`read()`, where a CorruptCheckpointError on any process is raised on every process.

    Each process reads its own files; if one fails while the others went on to the checksums (a collective
    computation) or to the next step, the run would hang. The processes first agree on success."""
    error = None
    try:
        result = read()
    except CorruptCheckpointError as e:
        error, result = e, None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
        if error is None and failed.any():
            error = CorruptCheckpointError(directory, f"process {int(np.argmax(failed))} cannot read it")
    if error is not None:
        raise error
    return result


def read_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config saved with `step` (CorruptCheckpointError on every process if any cannot read it)."""
    return _read_together(step_dir(manager, step), lambda: _read_config(manager, step))


def _read_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    restored = _restore(manager, step, {"config": ocp.args.JsonRestore()})
    if not isinstance(restored["config"], dict):
        raise CorruptCheckpointError(step_dir(manager, step), "item config/ is not a JSON object")
    return ml_collections.ConfigDict(restored["config"])


def _integrity(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The step's checksums; None for a step saved before checksums existed (its metadata lists no item)."""
    directory = step_dir(manager, step)
    try:
        handlers = json.loads((directory / "_CHECKPOINT_METADATA").read_text()).get("item_handlers", {})
    except (OSError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(directory, f"cannot read _CHECKPOINT_METADATA: {first_line(e)}") from e
    if "integrity" not in handlers:
        return None
    saved = _restore(manager, step, {"integrity": ocp.args.JsonRestore()})["integrity"]
    if not isinstance(saved, dict) or "version" not in saved:
        raise CorruptCheckpointError(directory, "item integrity/ is not a checksum record")
    if saved["version"] != INTEGRITY_VERSION:  # the arrays may be fine, but cannot be verified by this code
        raise CorruptCheckpointError(directory, f"item integrity/ holds checksums of version {saved['version']!r}; "
                                                f"this diffax computes version {INTEGRITY_VERSION}")
    return saved


def check_step(manager: ocp.CheckpointManager, step: int) -> None:
    """NoCheckpointError, listing the steps there are, when `step` is not a committed step."""
    steps = sorted(manager.all_steps())
    if step not in steps:
        raise NoCheckpointError(f"{manager.directory}: no checkpoint at step {step}; have {steps or 'none'}")


def restore_train_state(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any | None,
                        step: int) -> Any:
    """The TrainState at `step`, placed with `abstract_state`'s shardings and checked against its checksums,
    and the data iterator moved to where that step left it. `abstract_state` is a TrainState of
    ShapeDtypeStructs, each with the sharding it should have now: the saving run's device and process count
    do not matter. Raises CorruptCheckpointError when the step cannot be read or fails its checksums.

    The data iterator's state is saved per process; a run resumed on another process count reads process
    0's, which diffax.data's iterators make mean the same under any process count (it counts steps).
    """
    check_step(manager, step)
    if any(getattr(x, "sharding", None) is None for x in jax.tree.leaves(abstract_state)):
        # Orbax would fall back to the saved shardings, which only exist on the saving topology.
        raise ValueError("restore_train_state needs a sharding on every leaf of abstract_state")
    directory = step_dir(manager, step)
    target = {"step": abstract_state.step, "params": abstract_state.params, "opt_state": abstract_state.opt_state}
    has_skipped = _saved_keys(directory, "train_state") >= {"skipped"}
    if has_skipped:  # steps saved before skipped updates were counted have none: 0
        target["skipped"] = abstract_state.skipped
    items = {
        "train_state": ocp.args.StandardRestore(target),
        "ema_params": ocp.args.StandardRestore(abstract_state.ema_params),
    }
    data_dir = directory / "data"
    index, count = jax.process_index(), jax.process_count()
    same_topology = (data_dir / f"process_{index}-of-{count}.json").exists()  # grain's file name
    if data_iterator is not None and same_topology:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    integrity, restored = _read_together(directory, lambda: (_integrity(manager, step),
                                                             _restore(manager, step, items)))
    if integrity is not None:
        for item in ("train_state", "ema_params"):
            _verify(directory, item, restored[item], integrity.get(item, {}))
    if data_iterator is not None and not same_topology:
        saved = sorted(data_dir.glob("process_0-of-*.json"))
        if not saved:
            raise CorruptCheckpointError(directory, "item data/ holds no iterator state of process 0")
        try:
            data_iterator.set_state(json.loads(saved[0].read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(directory, f"cannot read {saved[0].name}: {first_line(e)}") from e
    ts = restored["train_state"]
    skipped = ts["skipped"] if has_skipped else jax.device_put(np.int32(0), abstract_state.skipped.sharding)
    return abstract_state.replace(step=ts["step"], params=ts["params"], opt_state=ts["opt_state"],
                                  ema_params=restored["ema_params"], skipped=skipped)


def _saved_keys(directory: Path, item: str) -> set[str]:
    """The top-level keys of a saved pytree item, from its metadata file (empty when unreadable: the
    restore that follows then reports the damage)."""
    try:
        tree = json.loads((directory / item / "_METADATA").read_text())["tree_metadata"]
        return {entry["key_metadata"][0]["key"] for entry in tree.values()}
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return set()


def set_aside(manager: ocp.CheckpointManager, steps: Iterable[int], folder: str) -> list[Path]:
    """Move committed steps to `checkpoints/<folder>/<step>` (process 0; every process waits), out of the
    manager's sight: Orbax neither lists nor garbage-collects them there, and new saves of the same step
    numbers do not collide with them. Returns where they went."""
    moved = []
    for step in sorted(steps):
        target = Path(manager.directory) / folder / str(step)
        n = 0
        while target.exists():  # the same step set aside before, by an earlier fallback or --step
            n += 1
            target = Path(manager.directory) / folder / f"{step}.{n}"
        moved.append(target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            step_dir(manager, step).rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("diffax_set_aside")
    manager.reload()
    return moved


def report(message: str) -> None:
    """One line on stderr from process 0: what a fallback or a config change tells the user."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def restore_for_sampling(workdir: str | Path, step: int | None = None
                         ) -> tuple[ml_collections.ConfigDict, Any, int]:
    """(config, EMA params as host numpy arrays, step) from a workdir, without the optimizer state.

    With `step` None this is the newest step that reads back and matches its checksums; each bad step
    passed over is reported in one line on stderr. An explicit bad `step` raises CorruptCheckpointError.
    """
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise NoCheckpointError(f"{workdir}: no checkpoints/ folder; train first with "
                                f"`python train.py --config=... --workdir={workdir}`")
    manager = make_manager(workdir, read_only=True)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise NoCheckpointError(f"{directory}: no complete checkpoint (a run killed before its first save?)")
    if step is not None:
        check_step(manager, step)
        return (*_restore_ema(manager, step), step)
    errors = []
    for candidate in steps:
        try:
            config, params = _restore_ema(manager, candidate)
        except CorruptCheckpointError as e:
            errors.append(e)
            report(f"warning: skipping corrupt checkpoint {e}")
            continue
        if errors:
            report(f"using checkpoint step {candidate}, the newest good one")
        return config, params, candidate
    raise CorruptCheckpointError(directory, f"no step reads back intact ({len(errors)} tried, see above)")


def _restore_ema(manager: ocp.CheckpointManager, step: int) -> tuple[ml_collections.ConfigDict, Any]:
    directory = step_dir(manager, step)
    integrity, config, params = _read_together(directory, lambda: _read_ema(manager, step))
    if integrity is not None:
        _verify(directory, "ema_params", params, integrity.get("ema_params", {}))
    return config, jax.device_get(params)


def _read_ema(manager: ocp.CheckpointManager, step: int) -> tuple[dict[str, Any] | None, ml_collections.ConfigDict,
                                                                  Any]:
    directory = step_dir(manager, step)
    integrity = _integrity(manager, step)
    config = _read_config(manager, step)
    _ignore_closed_loop_callbacks()
    try:
        metadata = manager.item_metadata(step)["ema_params"]
        # An explicit target, replicated on the current devices: without one Orbax would rebuild the saving
        # run's shardings, which fails on any other device or process count.
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated_everywhere()),
                              metadata)
    except Exception as e:  # a missing or garbled _METADATA file
        raise CorruptCheckpointError(directory, f"cannot read the metadata of ema_params: {first_line(e)}") from e
    params = _restore(manager, step, {"ema_params": ocp.args.StandardRestore(target)})["ema_params"]
    return integrity, config, params


def replicated_everywhere() -> jax.sharding.NamedSharding:
    """A full copy on every device of every process: a layout any topology can restore into and read."""
    return jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",)),
                                      jax.sharding.PartitionSpec())
