"""The attention backends agree with each other and with a float64 numpy softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import attention
from diffax.models.attention import dot_product_attention


def _numpy_attention(q, k, v, mask=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:  # a fully masked row attends uniformly, as the finite fill value makes it
        logits = np.where(mask, logits, np.where(np.asarray(mask).any(-1, keepdims=True), -np.inf, 0.0))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def _qkv(lq, lk, heads=3, dim=8, batch=2, dtype=jnp.float32):
    q = jax.random.normal(jax.random.key(0), (batch, lq, heads, dim))
    k, v = (jax.random.normal(jax.random.key(i), (batch, lk, heads, dim)) for i in (1, 2))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _mask(lq, lk):
    """Causal-style band & padding of the second batch element, with query 0 of batch 1 fully masked."""
    m = (np.arange(lk)[None] <= np.arange(lq)[:, None] * lk // lq + 3)[None, None]  # [1, 1, Lq, Lk]
    m = m & (np.arange(lk) < np.array([[lk], [lk - 4]]))[:, None, None]  # [2, 1, Lq, Lk]
    m[1, :, 0] = False
    return m


# (backend, chunk_size, key_chunk_size): chunks of 7 queries and 5 keys leave padded last blocks for 23 queries
# and 19 keys; 7/256 runs each query chunk one-shot (one block holds every key); 23/4 is one query chunk.
CASES = [("xla", None, None), ("chunked", 7, 256), ("chunked", 7, 5), ("chunked", 23, 4)]


@pytest.mark.parametrize("backend, chunk_size, key_chunk_size", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_backends_match_numpy(backend, chunk_size, key_chunk_size, masked):
    q, k, v = _qkv(23, 19)  # cross-attention: Lk != Lq, neither a multiple of a block
    mask = _mask(23, 19) if masked else None
    out = dot_product_attention(q, k, v, backend=backend, chunk_size=chunk_size, key_chunk_size=key_chunk_size,
                                mask=None if mask is None else jnp.asarray(mask))
    # fp32 with an fp32 softmax: ~1e-6 from the float64 answer.
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_blocks_long_keys_only():
    """On CPU 'auto' is 'chunked' with the CPU block sizes: the blocked online softmax past CPU_KEY_CHUNK keys
    (600 keys: 3 blocks of 200); 'xla' past ONE_SHOT_MAX_KEYS is the [B, L, H, D] einsum form. Same numbers."""
    assert jax.default_backend() == "cpu"
    assert attention._resolve("auto", jnp.float32, 64) == "chunked"
    assert attention.CPU_KEY_CHUNK < 600 and attention.ONE_SHOT_MAX_KEYS < 600
    q, k, v = _qkv(40, 600, heads=2, batch=1)
    mask = jnp.asarray(np.arange(600) < 590)  # [Lk]: padding, broadcast over batch, heads and queries
    for backend in ("auto", "xla"):
        out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend=backend, mask=mask))(q, k, v)
        np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, np.asarray(mask)), rtol=1e-5,
                                   atol=1e-5)


def test_bf16_inputs_give_bf16_close_to_numpy():
    q, k, v = _qkv(23, 19, dtype=jnp.bfloat16)
    want = _numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    for backend, chunk, key_chunk in CASES:
        out = dot_product_attention(q, k, v, backend=backend, chunk_size=chunk, key_chunk_size=key_chunk)
        assert out.dtype == jnp.bfloat16
        # bf16 probabilities and output: a few bf16 ulps (2**-8) of the O(1) values.
        np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=0, atol=3e-2)


def _reference_loss(q, k, v, mask, w):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v) * w)


@pytest.mark.parametrize("backend, chunk_size, key_chunk_size", CASES[:1] + CASES[2:])
def test_gradients_match_plain_softmax(backend, chunk_size, key_chunk_size):
    """Training differentiates through every path; the blocked scan's gradients equal the plain softmax's."""
    q, k, v = _qkv(23, 19)
    mask = jnp.asarray(_mask(23, 19))
    w = jax.random.normal(jax.random.key(3), q.shape)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, backend=backend, chunk_size=chunk_size, key_chunk_size=key_chunk_size,
                                    mask=mask)
        return jnp.sum(out * w)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(_reference_loss, argnums=(0, 1, 2))(q, k, v, mask, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_named():
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="attention expects"):
        dot_product_attention(q, q[:, :, :1], q[:, :, :1])
    with pytest.raises(ValueError, match="backend must be one of"):
        dot_product_attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="scale must be positive"):
        dot_product_attention(q, q, q, scale=0.0)
    with pytest.raises(ValueError, match="chunk_size and key_chunk_size must be >= 1"):
        dot_product_attention(q, q, q, backend="chunked", key_chunk_size=0)


def test_auto_picks_cudnn_only_for_heads_it_takes(monkeypatch):
    """On GPU with half-precision inputs 'auto' is cuDNN flash attention, except for heads it refuses:
    wider than 128 (SD 1.x's 160, the VAE's 512) or not a multiple of 8."""
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    assert attention._resolve("auto", jnp.bfloat16, 64) == "cudnn"
    assert attention._resolve("auto", jnp.bfloat16, 160) == "xla"
    assert attention._resolve("auto", jnp.bfloat16, 512) == "xla"
    assert attention._resolve("auto", jnp.float16, 100) == "xla"
    assert attention._resolve("auto", jnp.float32, 64) == "xla"
    assert attention._resolve("chunked", jnp.bfloat16, 512) == "chunked"
