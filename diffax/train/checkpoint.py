"""Orbax checkpoints of a run: train state, EMA params, the config and the data iterator position.

Layout of `workdir/checkpoints/<step>/`:
  train_state/  {step, params, opt_state}     what resuming needs
  ema_params/   the EMA weights                  all that sampling needs (restored alone)
  config/       the run's ConfigDict as JSON     rebuilds the model without the original config file
  data/         grain iterator state per process the next batch after resuming
Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact; saves are asynchronous (training continues while they are written).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class NoCheckpointError(FileNotFoundError):
    """A workdir holds no complete checkpoint."""


def make_manager(workdir: str | Path, *, max_to_keep: int = 3, read_only: bool = False,
                 enable_async: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager over `workdir/checkpoints` keeping the last `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=enable_async,
                                           cleanup_tmp_directories=not read_only)
    item_handlers = {
        "train_state": ocp.StandardCheckpointHandler(),
        "ema_params": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options,
                                 item_handlers=item_handlers)


def save(manager: ocp.CheckpointManager, state: Any, config: ml_collections.ConfigDict,
         data_iterator: Any | None) -> None:
    """Start an asynchronous save of `state` (a TrainState) at its step."""
    items = {
        "train_state": ocp.args.StandardSave({"step": state.step, "params": state.params,
                                              "opt_state": state.opt_state}),
        "ema_params": ocp.args.StandardSave(state.ema_params),
        "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    }
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(int(jax.device_get(state.step)), args=ocp.args.Composite(**items))


def restore_train_state(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any | None,
                        step: int | None = None) -> Any:
    """The TrainState at `step` (default: latest), placed with `abstract_state`'s shardings, and the data
    iterator moved to where that step left it. `abstract_state` is a TrainState of ShapeDtypeStructs, each
    with the sharding it should have now: the saving run's device and process count do not matter.

    The data iterator's state is saved per process; a run resumed on another process count reads process
    0's, which diffax.data's iterators make mean the same under any process count (it counts steps).
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise NoCheckpointError(f"{manager.directory}: no checkpoint to resume from")
    if any(getattr(x, "sharding", None) is None for x in jax.tree.leaves(abstract_state)):
        # Orbax would fall back to the saved shardings, which only exist on the saving topology.
        raise ValueError("restore_train_state needs a sharding on every leaf of abstract_state")
    items = {
        "train_state": ocp.args.StandardRestore({"step": abstract_state.step, "params": abstract_state.params,
                                                 "opt_state": abstract_state.opt_state}),
        "ema_params": ocp.args.StandardRestore(abstract_state.ema_params),
    }
    data_dir = Path(manager.directory) / str(step) / "data"
    index, count = jax.process_index(), jax.process_count()
    same_topology = (data_dir / f"process_{index}-of-{count}.json").exists()  # grain's file name
    if data_iterator is not None and same_topology:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None and not same_topology:
        saved = sorted(data_dir.glob("process_0-of-*.json"))
        if not saved:
            raise NoCheckpointError(f"{data_dir}: no data iterator state to resume from")
        data_iterator.set_state(json.loads(saved[0].read_text()))
    ts = restored["train_state"]
    return abstract_state.replace(step=ts["step"], params=ts["params"], opt_state=ts["opt_state"],
                                  ema_params=restored["ema_params"])


def restore_for_sampling(workdir: str | Path, step: int | None = None
                         ) -> tuple[ml_collections.ConfigDict, Any, int]:
    """(config, EMA params as host numpy arrays, step) from a workdir, without the optimizer state."""
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise NoCheckpointError(f"{workdir}: no checkpoints/ folder; train first with "
                                f"`python train.py --config=... --workdir={workdir}`")
    manager = make_manager(workdir, read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise NoCheckpointError(f"{directory}: no complete checkpoint (a run killed before its first save?)")
    if step not in manager.all_steps():
        raise NoCheckpointError(f"{directory}: no checkpoint at step {step}; have {sorted(manager.all_steps())}")
    # An explicit target, replicated on the current devices: without one Orbax would rebuild the saving run's
    # shardings, which fails on any other device or process count.
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated_everywhere()),
                          manager.item_metadata(step)["ema_params"])
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                             ema_params=ocp.args.StandardRestore(target)))
    config = ml_collections.ConfigDict(restored["config"])
    return config, jax.device_get(restored["ema_params"]), step


def replicated_everywhere() -> jax.sharding.NamedSharding:
    """A full copy on every device of every process: a layout any topology can restore into and read."""
    return jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",)),
                                      jax.sharding.PartitionSpec())
