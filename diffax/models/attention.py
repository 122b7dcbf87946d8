"""The one attention function every diffax model calls, with a backend switch.

backends:
  'xla'      one shot: scores -> fp32 softmax -> weighted sum, which XLA fuses; any dtype. The whole
             [B, H, Lq, Lk] score matrix exists at once. On CPU, up to `ONE_SHOT_MAX_KEYS` keys, heads-major with
             the scale in the exponent and the normalisation on the output; else einsums on [B, L, H, D].
  'chunked'  memory-bounded flash-style attention: queries in chunks of `chunk_size`, and for each chunk an
             online softmax (Milakov & Gimelshein 2018) over blocks of `key_chunk_size` keys in a `lax.scan`,
             so at most [B, H, chunk_size, key_chunk_size] scores exist at once. A problem that fits in one
             block falls through to the one-shot path, so short sequences pay nothing for it.
  'cudnn'    cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, fp16/bf16 inputs only).
  'splash'   jax's Pallas splash-attention kernel for TPU (diffax/models/splash_attention.py), blocks of
             `chunk_size` queries and `key_chunk_size` keys (multiples of 128; default by dtype). Off TPU it
             runs in Pallas interpret mode (correct, slow: for tests). Its masks are static per-head patterns,
             not the boolean arrays this function takes, so a call with a `mask` runs 'xla' instead.
  'auto'     `auto_backend(platform, ...)`:
             GPU: 'cudnn' for half-precision inputs and heads cuDNN's flash attention takes (at most 128 wide,
             a multiple of 8; SD 1.x's 160-wide and the VAE's 512-wide heads are not), else 'xla' while its
             fp32 scores take at most 1/`GPU_SCORE_SHARE` of the device's memory, else 'chunked'.
             TPU: 'splash' for unmasked calls with at least `SPLASH_MIN_QUERIES` queries, else 'xla'.
             CPU: 'chunked' with the CPU block sizes: one shot (heads-major) up to `CPU_KEY_CHUNK` keys and
             `CPU_QUERY_CHUNK` queries; past `CPU_KEY_CHUNK` keys, where the score matrix no longer fits in
             cache, blocked, one group of heads after the other (`step_shape`).
             Other platforms: 'xla'.
Softmax always runs in fp32. An optional boolean `mask` (True: attend) serves causal and padding masks
(CLIP's text encoder); every backend takes it. docs/performance.md has the measurements behind the choices.
"""
from __future__ import annotations

import math

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from diffax import parallel
from diffax.models.splash_attention import splash_attention

BACKENDS = ("auto", "xla", "cudnn", "chunked", "splash")

# CPU sizes, measured with XLA's CPU backend on 2-core x86 machines (docs/performance.md): one-shot attention
# wins while the scores are small; above that, blocks of 256 keys keep each step's scores in cache instead of
# streaming the whole [B, H, Lq, Lk] matrix (64 MiB-1 GiB) through memory, at 0.4-0.6x the one-shot time at
# 1024-4096 tokens. One-shot calls on more queries (cross-attention) run in chunks of `CPU_QUERY_CHUNK`.
ONE_SHOT_MAX_KEYS = 256
CPU_KEY_CHUNK = 256
CPU_QUERY_CHUNK = 1024
# A blocked step's fp32 scores and running output, [rows, key block + D] with one row per query and head,
# stay under this many bytes: the step runs on a group of heads and a chunk of queries sized to it, one
# group after the other. Steps over every head at once (B * H MiB of scores at 1024 queries) took 1.1-1.4x
# the time forward and up to 1.3x differentiated at SD's shapes: each pass over the scores left the cache.
CPU_STEP_BYTES = 5 << 20

# TPU: below this many queries 'auto' keeps XLA's fused one-shot attention, whose [Lq, Lk] scores are small
# there, and spares the kernel's block padding. A guess from maxdiffusion's practice (its
# `flash_min_seq_length`: 512 for Flux, 4096 for Wan), not measured: no TPU was available.
SPLASH_MIN_QUERIES = 1024

# GPU: 'auto' runs fp32 (and cuDNN-refused) attention one shot while its [B, H, Lq, Lk] fp32 scores take at
# most this share of the device's memory; the program holds them about twice (with their exponentials).
# One shot is 1.4-1.6x torch's fp32 SDPA at 4096 tokens on an H200, 'chunked' 0.6-0.8x but with 40-180 MiB
# of buffers (docs/benchmarks.md): past this share speed yields to fitting, as SD 1.5 at 1024x1024 (16 GiB
# of scores with guidance) or a VAE decode at 2048x2048 (16 GiB a batch element) would otherwise not.
GPU_SCORE_SHARE = 16

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked row gives uniform weights, not NaN


def auto_backend(platform: str, dtype: jnp.dtype, q_shape: Sequence[int], masked: bool = False,
                 keys: int | None = None, device_bytes: int | None = None) -> str:
    """The backend 'auto' runs for queries q [B, Lq, H, D] of `dtype` (with a mask or not) over `keys` keys
    (None: as many as queries) on `platform` ('cpu', 'gpu', 'tpu', as `jax.default_backend()` names it), on
    a device of `device_bytes` of memory (None: unknown, no limit)."""
    if platform == "gpu":
        batch, queries, heads, head_dim = q_shape
        half = dtype in (jnp.bfloat16, jnp.float16)
        if half and head_dim <= 128 and head_dim % 8 == 0:
            return "cudnn"
        scores = 4 * batch * heads * queries * (queries if keys is None else keys)  # fp32 [B, H, Lq, Lk]
        return "chunked" if device_bytes and scores * GPU_SCORE_SHARE > device_bytes else "xla"
    if platform == "tpu":
        return "splash" if not masked and q_shape[1] >= SPLASH_MIN_QUERIES else "xla"
    return "chunked" if platform == "cpu" else "xla"


def _device_bytes() -> int | None:
    """The memory XLA may use on this process's first device, None where the runtime does not say."""
    stats = jax.local_devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


def _resolve(backend: str, q: jax.Array, keys: int, masked: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        platform = jax.default_backend()
        device_bytes = _device_bytes() if platform == "gpu" else None
        return auto_backend(platform, q.dtype, q.shape, masked, keys, device_bytes)
    if backend == "splash" and masked:
        return "xla"
    return backend


def _even_chunks(length: int, chunk: int) -> tuple[int, int]:
    """(number of chunks, chunk length) covering `length` with chunks of at most `chunk` and the least padding."""
    n = -(-length // chunk)
    return n, -(-length // n)


def _reference(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, mask: jax.Array | None) -> jax.Array:
    """q [B, Lq, H, D], k = v [B, Lk, H, D] -> [B, Lq, H, D]: einsums on the models' layout."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _one_shot(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, mask: jax.Array | None) -> jax.Array:
    """q [B, H, Lq, D], k = v [B, H, Lk, D] heads-major, mask [B|1, H|1, Lq|1, Lk] -> fp32 [B, H, Lq, D]."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    # The scale rides in the exponent (max commutes with a positive scale) instead of a multiply of its own,
    # and the normalisation divides the [Lq, D] output, not the [Lq, Lk] probabilities. The max only keeps
    # exp in range (the output does not depend on it), so no gradient flows through it: differentiated, it
    # cost a mask and two more passes over the [Lq, Lk] scores for a gradient that is exactly zero.
    p = jnp.exp((logits - jax.lax.stop_gradient(logits).max(-1, keepdims=True)) * scale)
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out / p.sum(-1, keepdims=True)


def _key_blocks(k: jax.Array, v: jax.Array, mask: jax.Array | None, key_chunk: int) -> dict[str, jax.Array] | None:
    """k = v [B, H, Lk, D] and mask [B|1, H|1, Lq|1, Lk] cut into blocks of at most `key_chunk` keys along a
    new leading axis (the scan's), or None when one block holds every key."""
    lk = k.shape[2]
    n, kc = _even_chunks(lk, key_chunk)
    if n == 1:
        return None
    pad = n * kc - lk  # < kc, so every block holds a real key and its max is finite

    def cut(x: jax.Array) -> jax.Array:  # [B, H, Lk, D] -> [n, B, H, kc, D]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
        return jnp.moveaxis(x.reshape(*x.shape[:2], n, kc, x.shape[3]), 2, 0)

    blocks = {"k": cut(k), "v": cut(v)}
    if pad:
        blocks["valid"] = (jnp.arange(n * kc) < lk).reshape(n, kc)
    if mask is not None:  # [B|1, H|1, Lq|1, Lk] -> [n, B|1, H|1, Lq|1, kc]
        m = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad)))
        blocks["mask"] = jnp.moveaxis(m.reshape(*m.shape[:3], n, kc), 3, 0)
    return blocks


def _online(q: jax.Array, blocks: dict[str, jax.Array], scale: float) -> jax.Array:
    """`_one_shot` over `_key_blocks`: a running max, sum and output per query, one key block per scan step."""
    b, h, lq, d = q.shape

    # Checkpointed: the backward pass recomputes each block's scores instead of saving all of them.
    @jax.checkpoint
    def step(carry, x):
        top, total, acc = carry  # [B, H, Lq], [B, H, Lq], [B, H, Lq, D], fp32
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, x["k"], preferred_element_type=jnp.float32)
        if "mask" in x:
            logits = jnp.where(x["mask"], logits, _MASKED)
        if "valid" in x:
            logits = jnp.where(x["valid"], logits, -jnp.inf)  # padding keys get no weight, even in masked rows
        new_top = jnp.maximum(top, jax.lax.stop_gradient(logits).max(-1))  # no gradient, as in `_one_shot`
        p = jnp.exp((logits - new_top[..., None]) * scale)
        rescale = jnp.exp((top - new_top) * scale)  # exp(-inf) = 0 on the first block
        total = total * rescale + p.sum(-1)
        acc = acc * rescale[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(x["v"].dtype), x["v"],
                                                    preferred_element_type=jnp.float32)
        return (new_top, total, acc), None

    init = (jnp.full((b, h, lq), -jnp.inf, jnp.float32), jnp.zeros((b, h, lq), jnp.float32),
            jnp.zeros((b, h, lq, d), jnp.float32))
    (_, total, acc), _ = jax.lax.scan(step, init, blocks)
    return acc / total[..., None]


def _query_chunks(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, mask: jax.Array | None,
                  chunk: int, key_chunk: int) -> jax.Array:
    """q [B, H, Lq, D] in query chunks of at most `chunk`, each an online softmax over key blocks of at most
    `key_chunk` (or one shot when one block holds every key) -> fp32 [B, H, Lq, D]."""
    b, h, lq, d = q.shape
    blocks = _key_blocks(k, v, mask, key_chunk)  # cut once, outside the loop over query chunks

    def attend(qb: jax.Array, mb: jax.Array | None) -> jax.Array:  # mb: this chunk's rows of the mask
        if blocks is None:
            return _one_shot(qb, k, v, scale, mask if mb is None else mb)
        return _online(qb, blocks if mb is None else {**blocks, "mask": mb}, scale)

    n, qc = _even_chunks(lq, chunk)
    if n == 1:
        return attend(q, None)
    pad = n * qc - lq
    qs = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    qs = jnp.moveaxis(qs.reshape(b, h, n, qc, d), 2, 0)  # [n, B, H, qc, D]
    if mask is None or mask.shape[2] == 1:  # no mask, or one row that every query shares
        out = jax.lax.map(lambda qb: attend(qb, None), qs)
    else:  # the mask's query axis is cut into the same chunks
        m, axis = (mask, 2) if blocks is None else (blocks["mask"], 3)
        m = jnp.pad(m, [(0, pad) if i == axis else (0, 0) for i in range(m.ndim)], constant_values=True)
        m = jnp.moveaxis(m.reshape(*m.shape[:axis], n, qc, *m.shape[axis + 1:]), axis, 0)
        out = jax.lax.map(lambda x: attend(*x), (qs, m))
    return jnp.moveaxis(out, 0, 2).reshape(b, h, n * qc, d)[:, :, :lq]


def step_shape(heads: int, lq: int, lk: int, head_dim: int, chunk: int | None = None,
               key_chunk: int = CPU_KEY_CHUNK) -> tuple[int, int]:
    """(heads per group, queries per chunk) of the blocked CPU path for one batch element's q [lq, heads,
    head_dim] over `lk` keys: the largest chunk (`chunk` if given), then the largest group of heads, whose
    steps, [group, chunk, key block + head_dim] in fp32, fit in `CPU_STEP_BYTES` (at least one head)."""
    kc = _even_chunks(lk, key_chunk)[1]
    rows = max(1, CPU_STEP_BYTES // (4 * (kc + head_dim)))  # query-head rows of one step
    qc = _even_chunks(lq, chunk or rows)[1]
    group = max(g for g in range(1, heads + 1) if heads % g == 0 and (g == 1 or g * qc <= rows))
    return group, qc


def _map_slices(fn: Callable[..., jax.Array], axis: int, size: int, q: jax.Array, k: jax.Array, v: jax.Array,
                mask: jax.Array | None) -> jax.Array:
    """fn(q, k, v, mask) -> [B, H, Lq, D] on slices of `size` along `axis` (0: batch, 1: heads) of q, k, v,
    one after the other (`lax.map`); the mask is sliced where it has the axis, else every call takes it whole."""
    n = q.shape[axis] // size
    if n == 1:
        return fn(q, k, v, mask)

    def split(x: jax.Array) -> jax.Array:  # [..., n * size, ...] -> [n, ..., size, ...]
        return jnp.moveaxis(x.reshape(*x.shape[:axis], n, size, *x.shape[axis + 1:]), axis, 0)

    sliced_mask = mask is not None and mask.shape[axis] > 1
    out = jax.lax.map(lambda x: fn(*x[:3], x[3] if sliced_mask else mask),
                      (split(q), split(k), split(v), split(mask) if sliced_mask else None))
    return jnp.moveaxis(out, 0, axis).reshape(q.shape)


def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, mask: jax.Array | None,
             chunk: int | None, key_chunk: int) -> jax.Array:
    """q [B, H, Lq, D], k = v [B, H, Lk, D] -> fp32 [B, H, Lq, D] in query chunks of at most `chunk` (default
    `CPU_QUERY_CHUNK`), each over key blocks of at most `key_chunk`. On a CPU a call with more than one key
    block runs per batch element and group of heads, one after the other, in steps sized by `step_shape`."""
    if jax.default_backend() != "cpu" or k.shape[2] <= key_chunk:
        return _query_chunks(q, k, v, scale, mask, chunk or CPU_QUERY_CHUNK, key_chunk)

    def per_shard(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
        group, qc = step_shape(q.shape[1], q.shape[2], k.shape[2], q.shape[3], chunk, key_chunk)

        def heads(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
            return _query_chunks(q, k, v, scale, mask, qc, key_chunk)

        return _map_slices(lambda *x: _map_slices(heads, 1, group, *x), 0, 1, q, k, v, mask)

    # Under a mesh the loops run per shard: a loop along a split axis would gather it first.
    spec = parallel.activation_spec(("batch", "heads", None, None), q.shape)
    if spec is None:
        return per_shard(q, k, v, mask)
    args, specs = (q, k, v), (spec, spec, spec)
    if mask is not None:  # [B|1, H|1, Lq|1, Lk]: split along the axes it has
        args, specs = args + (mask,), specs + (P(*(a if n > 1 else None for a, n in zip(spec[:2], mask.shape))),)
    # check_vma off: the scans' fresh initial carries are not marked as varying over the mesh axes.
    return jax.shard_map(lambda *x: per_shard(*x[:3], x[3] if mask is not None else None), in_specs=specs,
                         out_specs=spec, check_vma=False)(*args)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto",
                          scale: float | None = None, chunk_size: int | None = None,
                          key_chunk_size: int | None = None, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T * scale) v over heads.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype. `scale` (> 0) defaults to D**-0.5.
    mask: booleans broadcastable to [B, H, Lq, Lk], True where a query may attend to a key (a causal mask
    [1, 1, Lq, Lk] and a padding mask [B, 1, 1, Lk] combine with `&`); None attends everywhere.
    chunk_size, key_chunk_size: the 'chunked' backend's queries per chunk and keys per block (default
    `CPU_KEY_CHUNK` keys; queries: `CPU_QUERY_CHUNK`, or on a CPU past one key block as many as fit
    `CPU_STEP_BYTES`, see `step_shape`); smaller blocks bound memory tighter. For 'splash', the kernel's
    query and key block sizes (multiples of 128; default `splash_attention.block_sizes`).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[::2] != k.shape[::2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q [B, Lq, H, D], k = v [B, Lk, H, D]; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if mask is not None:
        full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        if mask.ndim > 4 or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
            raise ValueError(f"attention mask {mask.shape} does not broadcast to [B, H, Lq, Lk] = {full}")
        mask = jnp.broadcast_to(mask, (1,) * (4 - mask.ndim) + mask.shape).astype(bool)  # [B|1, H|1, Lq|1, Lk]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not scale > 0:
        raise ValueError(f"attention scale must be positive, got {scale}")
    key_chunk = CPU_KEY_CHUNK if key_chunk_size is None else key_chunk_size
    if (chunk_size is not None and chunk_size < 1) or key_chunk < 1:
        raise ValueError(f"attention chunk_size and key_chunk_size must be >= 1, got {chunk_size}, {key_chunk}")
    backend = _resolve(backend, q, k.shape[1], mask is not None)
    if backend == "splash":
        return splash_attention(q, k, v, scale=scale, block_q=chunk_size, block_kv=key_chunk_size)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    if backend == "xla" and not (jax.default_backend() == "cpu" and k.shape[1] <= ONE_SHOT_MAX_KEYS):
        # Measured on CPU: past a few hundred keys XLA's one-shot fusion is faster on this form than on the
        # heads-major one (docs/performance.md); other platforms keep the form their compilers were tuned on.
        return _reference(q, k, v, scale, mask)
    # Heads-major [B, H, L, D]: each head's scores are one plain matmul with contiguous rows. XLA writes the
    # three transposes as copies (O(L D), cheap next to the O(L^2) scores); in [B, L, H, D] it instead picks
    # transposed layouts for k, v and the output and scales and normalises the whole [Lq, Lk] matrix.
    qh, kh, vh = (x.swapaxes(1, 2) for x in (q, k, v))
    if backend == "chunked":
        out = _chunked(qh, kh, vh, scale, mask, chunk_size, key_chunk)
    else:
        out = _one_shot(qh, kh, vh, scale, mask)
    return out.swapaxes(1, 2).astype(q.dtype)
