"""The one attention function every diffax model calls, with a backend switch.

backends:
  'xla'      einsum -> fp32 softmax -> einsum, which XLA fuses; portable reference, any dtype.
  'cudnn'    cuDNN flash attention through the same API (GPU, fp16/bf16 inputs only).
  'chunked'  memory-efficient attention (Rabe & Staats 2021): queries in chunks, so the [Lq, Lk] logits
             never exist whole; for large images on any backend.
  'auto'     'cudnn' on GPU with half-precision inputs and heads cuDNN's flash attention takes (at most 128
             wide, a multiple of 8; SD 1.x's 160-wide and the VAE's 512-wide heads are not), else 'xla'.
Softmax always runs in fp32. An optional boolean `mask` (True: attend) serves causal and padding masks
(CLIP's text encoder); every backend takes it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn", "chunked")


def _resolve(backend: str, dtype: jnp.dtype, head_dim: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        half = dtype in (jnp.bfloat16, jnp.float16)
        flash_head = head_dim <= 128 and head_dim % 8 == 0
        return "cudnn" if half and flash_head and jax.default_backend() == "gpu" else "xla"
    return backend


def _reference(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, mask: jax.Array | None = None) -> jax.Array:
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        # The finite minimum, not -inf: a fully masked row gives uniform weights instead of NaN.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk: int,
             mask: jax.Array | None = None) -> jax.Array:
    lq = q.shape[1]
    chunk = min(chunk, lq)  # fewer queries than a chunk: one block, no padded work
    pad = -lq % chunk
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    blocks = qp.reshape(q.shape[0], -1, chunk, *q.shape[2:]).swapaxes(0, 1)  # [n, B, chunk, H, D]
    if mask is None:
        out = jax.lax.map(lambda qb: _reference(qb, k, v, scale), blocks)  # [n, B, chunk, H, D]
    else:  # the mask's query axis is cut into the same chunks
        m = jnp.broadcast_to(mask, (*mask.shape[:2], lq, mask.shape[3]))
        m = jnp.pad(m, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        m = jnp.moveaxis(m.reshape(*m.shape[:2], -1, chunk, m.shape[3]), 2, 0)  # [n, B|1, H|1, chunk, Lk]
        out = jax.lax.map(lambda qm: _reference(qm[0], k, v, scale, qm[1]), (blocks, m))
    return out.swapaxes(0, 1).reshape(q.shape[0], -1, *q.shape[2:])[:, :lq]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto",
                          scale: float | None = None, chunk_size: int = 1024,
                          mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T * scale) v over heads.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype. `scale` defaults to D**-0.5.
    mask: booleans broadcastable to [B, H, Lq, Lk], True where a query may attend to a key (a causal mask
    [1, 1, Lq, Lk] and a padding mask [B, 1, 1, Lk] combine with `&`); None attends everywhere.
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
    backend = _resolve(backend, q.dtype, q.shape[-1])
    if backend == "chunked":
        return _chunked(q, k, v, scale, chunk_size, mask)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    return _reference(q, k, v, scale, mask)
