"""From a `data` config to a deterministic, sharded, checkpointable batch iterator.

The order of examples is a pure function of (seed, step): grain's `MapDataset`
shuffles by index (a fresh permutation every epoch), so there is no shuffle
buffer to warm up, and the iterator state is a few integers. The training loop
saves that state inside its Orbax checkpoint:

    mngr.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(it)))

and a resumed run then sees exactly the batches an uninterrupted run would have.

Sharding: the shuffled stream is cut into blocks of b = global_batch / P
examples, dealt round-robin to the P processes: at step s process p takes block
s * P + p, i.e. rows [p * b, (p + 1) * b) of the global batch s. The global batch
that `parallel.shard_batch` assembles (process p's rows land at rows p * b ...,
since the mesh lists each process's devices together) is therefore the
single-process batch row for row, whatever the number of processes, and the
per-row noise the train step draws matches too. The iterator state counts
steps, so it means the same thing under any process count. (grain's
`IndexSampler` instead gives each process a fixed contiguous block of the
source, so with a class-sorted image folder a process would only ever see some
of the classes.)
"""

from __future__ import annotations

from typing import Protocol

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from diffax.data.digits import DigitsSource
from diffax.data.dreambooth import DreamBoothSource
from diffax.data.folder import FolderSource
from diffax.data.latent_cache import LatentCacheSource
from diffax.data.subset import ClassSubset
from diffax.data.tfds_source import TfdsSource

SOURCES = ('digits', 'tfds', 'folder', 'latent_cache', 'dreambooth')


class Source(Protocol):
    """What every diffax source provides (grain's random-access source protocol, plus classes)."""

    num_classes: int  # 0 for unlabeled data.
    class_names: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def make_source(config: ml_collections.ConfigDict) -> Source:
    """Builds the source named by `config.source`.

    Args:
        config: the `data` sub-config. `source` is one of 'digits', 'tfds',
            'folder', 'latent_cache'; `image_size` (int) and `channels` (1 or 3)
            apply to all but the latent cache. digits reads `caption_template`;
            tfds reads `tfds_name`, `split`, `image_key`, `label_key`, the
            optional `tfds_data_dir` and `caption_key`; folder reads `path`, `caption_column` and
            `conditioning_column`;
            latent_cache reads `path` (the cache folder); dreambooth reads `path`
            (a folder holding the caches instance/ and class/).

    Returns:
        A random-access source whose records are `{'image': uint8 [S, S, C],
        'label': int64 scalar}` (plus a 'caption' str where captions are set),
        or for a latent cache `{'image': float32 latent [h, w, c], 'label',
        'cond'}`; with `num_classes` and `class_names`.

    Raises:
        ValueError: an unknown source, a bad image size or channel count, or a
            problem the chosen source finds in its input.
    """
    classes = tuple(config.get('classes', ()))
    if classes:  # some classes only, e.g. a transfer task: pretrain on some digits, adapt to the others
        whole = ml_collections.ConfigDict(config.to_dict())
        whole.classes = ()
        return ClassSubset(make_source(whole), classes)
    if config.source == 'latent_cache':  # the cache fixes the latent shape: image_size / channels do not apply
        return LatentCacheSource(config.path)
    if config.source == 'dreambooth':  # instance/ and class/ latent caches, drawn in pairs
        return DreamBoothSource(config.path)
    image_size, channels = config.image_size, config.get('channels', 1)
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f'data.image_size must be a positive int, got {image_size!r}')
    if channels not in (1, 3):
        raise ValueError(f'data.channels must be 1 or 3, got {channels!r}')
    if config.source == 'digits':
        return DigitsSource(image_size=image_size, channels=channels,
                            caption_template=config.get('caption_template', '') or None)
    if config.source == 'tfds':
        return TfdsSource(
            config.tfds_name, split=config.get('split', 'train'), image_key=config.get('image_key', 'image'),
            label_key=config.get('label_key', 'label'), image_size=image_size, channels=channels,
            data_dir=config.get('tfds_data_dir', None), caption_key=config.get('caption_key', ''))
    if config.source == 'folder':
        return FolderSource(config.path, image_size=image_size, channels=channels,
                            caption_column=config.get('caption_column', ''),
                            conditioning_column=config.get('conditioning_column', ''))
    raise ValueError(f'data.source must be one of {SOURCES}, got {config.source!r}')


def _to_model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if 'prior' in batch:  # DreamBooth's draws are (instance, class) pairs [b, 2, ...]: consecutive rows
        batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    image = batch['image']
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 127.5 - 1.0  # [b, S, S, C] in [-1, 1]
    out = {'image': image.astype(np.float32), 'label': batch['label'].astype(np.int32)}  # float: latents as they are
    if 'cond' in batch:  # a latent cache's text conditioning, {'encoder_hidden_states': [b, L, D], ...}
        out['cond'] = {k: np.asarray(v, np.float32) for k, v in batch['cond'].items()}
    for key in ('input_ids', 'input_ids_2'):  # a latent cache's token ids [b, L] (SDXL: both tokenizers'),
        if key in batch:  # for a run that trains the text encoder(s)
            out[key] = batch[key].astype(np.int32)
    if 'prior' in batch:  # [2b] bool: the class rows, weighted by train.prior_loss_weight
        out['prior'] = batch['prior'].astype(bool)
    return out


def make_train_iterator(source: Source, *, global_batch_size: int, seed: int,
                        shard_index: int | None = None, shard_count: int | None = None,
                        num_epochs: int | None = None, worker_count: int = 0) -> grain.DatasetIterator:
    """Returns this process's iterator over shuffled training batches.

    Args:
        source: any random-access source of `{'image', 'label'}` records.
        global_batch_size: examples per step summed over all processes.
        seed: shuffle seed in [0, 2**32); each epoch is shuffled differently.
        shard_index: this process's shard; default `jax.process_index()`.
        shard_count: number of shards; default `jax.process_count()`.
        num_epochs: None repeats forever. Otherwise the stream stops after the
            last full global batch of `num_epochs` passes, so every process
            yields the same number of batches.
        worker_count: child processes decoding and batching (0: in this process).
            Worker w makes this shard's batches w, w + W, ...; they come out in
            order, so the batches do not depend on the worker count.

    Returns:
        An iterator of `{'image': float32 [b, S, S, C] in [-1, 1], 'label': int32 [b]}`
        numpy batches with `b = global_batch_size // shard_count`. It has
        `get_state()` / `set_state()` (a JSON-able dict) and is saved by Orbax
        with `grain.checkpoint.CheckpointSave(it)`, restored with
        `grain.checkpoint.CheckpointRestore(it)`.

    Raises:
        ValueError: the batch size does not divide over the shards, the shard
            index is out of range, or `num_epochs` passes hold no full batch.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f'shard_index must be in [0, shard_count={shard_count}), got {shard_index}')
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(
            f'global_batch_size={global_batch_size} must be a positive multiple of the number of '
            f'data shards (processes) shard_count={shard_count}')
    # A source that draws its records from stored distributions (the latent cache: a random crop and a
    # posterior sample) shuffles what it stores and draws after repeating, so every epoch draws afresh; the
    # draw's generator is a function of (seed, position in the stream), so resuming draws the same.
    draw = getattr(source, 'draw', None)
    ds = grain.MapDataset.source(source.stored if draw else source).shuffle(seed=seed).repeat(num_epochs)
    if num_epochs is not None:
        num_examples = len(ds) // global_batch_size * global_batch_size
        if num_examples == 0:
            raise ValueError(
                f'{num_epochs} epoch(s) of {len(source)} examples hold no full global batch of '
                f'{global_batch_size}')
        ds = ds[:num_examples]
    # Blocks of b consecutive examples; block s * P + p is process p's part of global batch s.
    if draw is not None:
        ds = ds.random_map(draw, seed=seed)
    ds = ds.batch(global_batch_size // shard_count, drop_remainder=True)[shard_index::shard_count]
    ds = ds.map(_to_model_inputs).to_iter_dataset()
    if worker_count > 0:
        # grain's worker processes read absl flags. Outside an absl app (a notebook,
        # a test) nobody parsed them, and the workers would fail: take the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ds)

