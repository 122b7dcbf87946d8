"""The one attention function every diffax model calls, with a backend switch.

backends:
  'xla'      einsum -> fp32 softmax -> einsum, which XLA fuses; portable reference, any dtype.
  'cudnn'    cuDNN flash attention through the same API (GPU, fp16/bf16 inputs only).
  'chunked'  memory-efficient attention (Rabe & Staats 2021): queries in chunks, so the [Lq, Lk] logits
             never exist whole; for large images on any backend.
  'auto'     'cudnn' on GPU with half-precision inputs, else 'xla'.
Softmax always runs in fp32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn", "chunked")


def _resolve(backend: str, dtype: jnp.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        half = dtype in (jnp.bfloat16, jnp.float16)
        return "cudnn" if half and jax.default_backend() == "gpu" else "xla"
    return backend


def _reference(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk: int) -> jax.Array:
    lq = q.shape[1]
    chunk = min(chunk, lq)  # fewer queries than a chunk: one block, no padded work
    pad = -lq % chunk
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    blocks = qp.reshape(q.shape[0], -1, chunk, *q.shape[2:]).swapaxes(0, 1)  # [n, B, chunk, H, D]
    out = jax.lax.map(lambda qb: _reference(qb, k, v, scale), blocks)  # [n, B, chunk, H, D]
    return out.swapaxes(0, 1).reshape(q.shape[0], -1, *q.shape[2:])[:, :lq]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto",
                          scale: float | None = None, chunk_size: int = 1024) -> jax.Array:
    """softmax(q k^T * scale) v over heads.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype. `scale` defaults to D**-0.5.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[::2] != k.shape[::2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q [B, Lq, H, D], k = v [B, Lk, H, D]; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    backend = _resolve(backend, q.dtype)
    if backend == "chunked":
        return _chunked(q, k, v, scale, chunk_size)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    return _reference(q, k, v, scale)
