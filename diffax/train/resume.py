"""Resuming a run: which checkpoint step to continue from, and whether the new config may continue it.

The newest step that reads back intact is used (or `--step`); bad newer steps are reported in one line each
and moved to `checkpoints/corrupt/<step>`. Before any array is restored, the config saved with the step is
compared with the new one:

* keys that fix what the checkpoint means may not change: the `model` block except `remat` (it changes
  memory and compute, not the math), `diffusion.*` (the
  noise schedule and prediction type the weights were trained for) except `snr_gamma`, the data set's
  identity (`data.source`, `image_size`, `channels`, `tfds_name`, `split`, `image_key`, `label_key`), and
  what the saved state and data position are counted in: `seed` (the shuffle order the position indexes),
  `train.batch_size` (the position counts batches: another size would skip or repeat examples) and
  `train.grad_accum_steps` (it changes the optimizer state's structure). A change is a `ConfigChangeError`
  naming each key, old -> new.
* every other key may change (train.steps, the learning-rate schedule, `snr_gamma`, intervals, the sample
  block, the mesh, data locations and workers): the change is reported in one line and appended to
  `WORKDIR/config_history.jsonl`, whose first record holds the run's first config in full. The config
  saved with each new step is the run's config in force from then on.

A run trained from a latent cache records the cache's path and manifest fingerprint in
`WORKDIR/data_cache.json` when it starts; resuming on a cache with another fingerprint (re-encoded with other
encoders, data or options) is a `CacheChangeError` naming both paths, unless `data.allow_cache_change`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from diffax.train import checkpoint

HISTORY_FILE = "config_history.jsonl"
CACHE_FILE = "data_cache.json"

# Dotted keys (and blocks) that may not change when resuming, and the exceptions inside those blocks.
FIXED_KEYS = ("model", "diffusion", "data.source", "data.image_size", "data.channels", "data.tfds_name",
              "data.split", "data.image_key", "data.label_key", "data.classes", "seed", "train.batch_size",
              "train.grad_accum_steps", "train.finetune", "train.init_from", "train.lora", "train.tuneqdm",
              "train.text_encoder", "train.controlnet_from", "train.controlnet_embedding_channels")
FREE_KEYS = ("diffusion.snr_gamma", "model.remat")
_ABSENT = "<absent>"


class ConfigChangeError(ValueError):
    """The new config changes a key that a resumed run may not change."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a config as JSON (lists and empty blocks stay whole values)."""
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: tree}


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def is_fixed(key: str) -> bool:
    """Whether a dotted config key may not change when a run resumes."""
    under = lambda names: any(key == n or key.startswith(n + ".") for n in names)  # noqa: E731
    return under(FIXED_KEYS) and not under(FREE_KEYS)


def config_changes(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict
                   ) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every key that differs ('<absent>' where a side lacks it)."""
    old, now = _flat(_as_json(saved)), _flat(_as_json(new))
    return {key: (old.get(key, _ABSENT), now.get(key, _ABSENT)) for key in sorted(set(old) | set(now))
            if old.get(key, _ABSENT) != now.get(key, _ABSENT)}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key} {json.dumps(a)} -> {json.dumps(b)}" for key, (a, b) in changes.items())


def check_config(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict, step_dir: Path
                 ) -> dict[str, tuple[Any, Any]]:
    """The allowed changes from the config saved in `step_dir` to `new`; ConfigChangeError naming every
    fixed key that changed."""
    changes = config_changes(saved, new)
    fixed = {key: change for key, change in changes.items() if is_fixed(key)}
    if fixed:
        raise ConfigChangeError(
            f"cannot resume {step_dir} with a changed config: {_describe(fixed)} (these keys fix what the "
            f"checkpoint's weights, optimizer state or data position mean; set them back, or train in a new "
            f"--workdir)")
    return changes


class CacheChangeError(ValueError):
    """A resumed run was given a latent cache other than the one it was trained on."""


def check_cache(workdir: Path, source: Any, config: ml_collections.ConfigDict, resuming: bool) -> None:
    """Record the latent cache `source` (its path and manifest fingerprint) in WORKDIR/data_cache.json, or,
    when `resuming`, check it against the recorded one: CacheChangeError naming both paths when the
    fingerprints differ, unless data.allow_cache_change (then the new cache is recorded). Other sources: nothing."""
    fingerprint = (getattr(source, "manifest", None) or {}).get("fingerprint")
    if fingerprint is None:
        return
    path = Path(workdir) / CACHE_FILE
    now = {"path": str(Path(source.path).resolve()), "fingerprint": fingerprint}
    if resuming and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            return
        if not config.data.get("allow_cache_change", False):
            raise CacheChangeError(
                f"{path}: this run was trained on the latent cache {saved.get('path')} (fingerprint "
                f"{str(saved.get('fingerprint'))[:12]}), but data.path is {now['path']} (fingerprint "
                f"{fingerprint[:12]}), another cache; point data.path at the original, set "
                f"data.allow_cache_change=True to train on with this one, or train in a new --workdir")
        checkpoint.report(f"data.allow_cache_change: training on the latent cache {now['path']} instead of "
                          f"{saved.get('path')} (recorded in {path})")
    if jax.process_index() == 0:
        path.write_text(json.dumps(now, indent=1) + "\n")


def record_config(workdir: Path, step: int, config: ml_collections.ConfigDict,
                  changes: dict[str, tuple[Any, Any]] | None = None) -> None:
    """Append to WORKDIR/config_history.jsonl (process 0): the whole config when the file is new, else the
    changed keys."""
    if jax.process_index() != 0:
        return
    path = Path(workdir) / HISTORY_FILE
    record: dict[str, Any] = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if path.exists() and changes is not None:
        record["changed"] = {key: {"old": a, "new": b} for key, (a, b) in changes.items()}
    else:
        record["config"] = _as_json(config)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def resume(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any,
           config: ml_collections.ConfigDict, workdir: Path, step: int | None = None) -> Any:
    """The TrainState to continue from (or None when there is no checkpoint and no `step`).

    With `step` None: the newest step that reads back intact; each bad newer step is reported in one line
    and moved to `checkpoints/corrupt/<step>`. With `step`: exactly that step (NoCheckpointError listing the
    steps there are if it does not exist), and the later steps are moved to `checkpoints/superseded/<step>`,
    so that the run's new saves of those step numbers are written and garbage collection only counts the
    steps of the run being continued. Nothing is deleted.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        checkpoint.check_step(manager, step)
        candidates = [step]
    elif not steps:
        return None
    else:
        candidates = steps
    corrupt = []
    for candidate in candidates:
        directory = checkpoint.step_dir(manager, candidate)
        try:
            saved = checkpoint.read_config(manager, candidate)
            changes = check_config(saved, config, directory)
            state = checkpoint.restore_train_state(manager, abstract_state, data_iterator, candidate)
        except checkpoint.CorruptCheckpointError as e:
            if step is not None:
                raise
            checkpoint.report(f"warning: skipping corrupt checkpoint {e}")
            corrupt.append(candidate)
            continue
        break
    else:
        raise checkpoint.CorruptCheckpointError(
            Path(manager.directory), f"no step reads back intact (tried {candidates}); nothing was moved. "
            f"Train in a new --workdir, or move the bad steps away")
    later = [s for s in steps if s > candidate]
    moved_corrupt = checkpoint.set_aside(manager, corrupt, "corrupt")
    moved_later = checkpoint.set_aside(manager, [s for s in later if s not in corrupt], "superseded")
    if moved_corrupt:
        checkpoint.report(f"resuming from the newest good checkpoint, step {candidate}; corrupt steps moved to "
                          f"{', '.join(map(str, moved_corrupt))}")
    if moved_later:
        checkpoint.report(f"resuming from step {candidate}; later steps moved to "
                          f"{', '.join(map(str, moved_later))}")
    if changes:
        if not (Path(workdir) / HISTORY_FILE).exists():
            record_config(workdir, candidate, saved)  # a run from before the history: its config as saved
        record_config(workdir, candidate, config, changes)
        checkpoint.report(f"config changed since step {candidate}: {_describe(changes)} (recorded in "
                          f"{Path(workdir) / HISTORY_FILE})")
    return state
