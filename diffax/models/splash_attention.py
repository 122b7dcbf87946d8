"""Splash attention: jax's Pallas flash-attention kernel for TPU behind diffax's [B, L, H, D] attention call.

The kernel is `jax.experimental.pallas.ops.tpu.splash_attention` (what MaxText and maxdiffusion run on TPU):
an online softmax over [block_q, block_kv] tiles in VMEM with a backward pass of its own (a custom VJP),
so the [Lq, Lk] score matrix never reaches HBM. It works on one batch element's heads-major [H, L, D]
arrays whose lengths are whole blocks, and has no softmax-scale argument. So this module

  - scales q by the softmax scale before the kernel (as maxdiffusion does);
  - pads the head dim with zeros to a multiple of 128, the TPU's lane width (zero columns add nothing to
    q k^T, and the output's zero columns are cut off);
  - pads Lq and Lk to whole blocks; padded keys get segment id 0 and real keys and every query id 1, so no
    query attends to a padded key, while padded queries (cut off after) see the real keys and keep a
    finite softmax and zero gradients;
  - maps the kernel over the batch with `jax.vmap`, and under a mesh (`diffax.parallel.use_rules`) runs
    the whole call per shard with `jax.shard_map` over the batch and heads axes of the logical rules,
    because XLA cannot partition a Pallas kernel and would gather its inputs onto every device instead.

Off TPU the kernel runs in Pallas interpret mode: the same kernel code, emulated with XLA ops, slowly.
That is how the tests check it on CPU; it is not a fast path anywhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from diffax import parallel

LANES = 128  # TPU vector lane width: block sizes and the padded head dim are multiples of it

# Query and key block sizes by input dtype: maxdiffusion's defaults for the same kernel (1024 for bf16,
# 512 for fp32), capped at the padded sequence length. Not tuned here: no TPU was available to measure.
DEFAULT_BLOCK = {"half": 1024, "float32": 512}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def block_sizes(lq: int, lk: int, dtype: jnp.dtype, block_q: int | None = None,
                block_kv: int | None = None) -> tuple[int, int]:
    """(queries, keys) per kernel block for Lq queries and Lk keys: `DEFAULT_BLOCK` for the dtype, capped
    at the length rounded up to a multiple of 128; `block_q` / `block_kv` (multiples of 128) override."""
    default = DEFAULT_BLOCK["half" if jnp.dtype(dtype).itemsize == 2 else "float32"]
    bq = min(default, _round_up(lq, LANES)) if block_q is None else block_q
    bkv = min(default, _round_up(lk, LANES)) if block_kv is None else block_kv
    for name, size in (("chunk_size", bq), ("key_chunk_size", bkv)):
        if size < LANES or size % LANES:
            raise ValueError(f"splash attention {name} (its block size) must be a positive multiple of "
                             f"{LANES}, got {size}")
    return bq, bkv


def _pad(x: jax.Array, length: int, depth: int) -> jax.Array:
    """[B, L, H, D] zero-padded to [B, length, H, depth]."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, depth - x.shape[3])))


def _local(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, bq: int, bkv: int,
           interpret: bool) -> jax.Array:
    """q [B, Lq, H, D], k = v [B, Lk, H, D] (one shard's) -> [B, Lq, H, D] through the splash kernel."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    lq_pad, lk_pad, d_pad = _round_up(lq, bq), _round_up(lk, bkv), _round_up(d, LANES)
    q = _pad(q * jnp.asarray(scale, q.dtype), lq_pad, d_pad)  # the kernel computes softmax(q k^T)
    k, v = _pad(k, lk_pad, d_pad), _pad(v, lk_pad, d_pad)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                              block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                              block_q_dq=bq, block_kv_dq=bkv)
    # Diffusion attention is non-causal: every block is full, so the kernel skips no tile and the only
    # masking is the padded keys' segment ids.
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((lq_pad, lk_pad))] * h)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    segment_ids = None
    if lk_pad > lk:
        segment_ids = splash.SegmentIds(q=jnp.ones((lq_pad,), jnp.int32),
                                        kv=(jnp.arange(lk_pad) < lk).astype(jnp.int32))
    heads_major = [x.swapaxes(1, 2) for x in (q, k, v)]  # [B, H, L, D]
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segment_ids))(*heads_major)
    return out.swapaxes(1, 2)[:, :lq, :, :d]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, block_q: int | None = None,
                     block_kv: int | None = None, interpret: bool | None = None) -> jax.Array:
    """softmax(q k^T * scale) v with jax's Pallas splash-attention kernel, no mask.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype; any lengths and head dims (padded
    here). block_q, block_kv: queries and keys per kernel block (see `block_sizes`). interpret: run the
    kernel in Pallas interpret mode; default: everywhere but on TPU. Under a mesh and logical rules the
    kernel runs per shard of the 'batch' and 'heads' axes.
    """
    bq, bkv = block_sizes(q.shape[1], k.shape[1], q.dtype, block_q, block_kv)
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret

    def local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return _local(q, k, v, scale, bq, bkv, interpret)

    # B and H are the same in q, k and v, and the sequence and head-dim axes stay whole: one spec fits all.
    spec = parallel.activation_spec(("batch", None, "heads", None), q.shape)
    if spec is None:
        return local(q, k, v)
    # check_vma off: the Pallas call does not declare how its outputs vary over the manual mesh axes.
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
