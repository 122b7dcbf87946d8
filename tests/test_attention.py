"""The attention backends agree with each other and with a float64 numpy softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models.attention import dot_product_attention


def _numpy_attention(q, k, v):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("backend, chunk_size", [("xla", 1024), ("chunked", 1024), ("chunked", 7)])
def test_backends_match_numpy(backend, chunk_size):
    q, k, v = (np.asarray(jax.random.normal(jax.random.key(i), (2, 23, 3, 8)), np.float64) for i in range(3))
    out = dot_product_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
                                backend=backend, chunk_size=chunk_size)
    # fp32 with fp32 softmax: ~1e-6; 23 queries over chunks of 7 exercises the padded last chunk.
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_backend_are_named():
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="attention expects"):
        dot_product_attention(q, q[:, :, :1], q[:, :, :1])
    with pytest.raises(ValueError, match="backend must be one of"):
        dot_product_attention(q, q, q, backend="flash")


def test_auto_picks_cudnn_only_for_heads_it_takes(monkeypatch):
    """On GPU with half-precision inputs 'auto' is cuDNN flash attention, except for heads it refuses:
    wider than 128 (SD 1.x's 160, the VAE's 512) or not a multiple of 8."""
    from diffax.models import attention
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    assert attention._resolve("auto", jnp.bfloat16, 64) == "cudnn"
    assert attention._resolve("auto", jnp.bfloat16, 160) == "xla"
    assert attention._resolve("auto", jnp.bfloat16, 512) == "xla"
    assert attention._resolve("auto", jnp.float16, 100) == "xla"
    assert attention._resolve("auto", jnp.float32, 64) == "xla"
    assert attention._resolve("chunked", jnp.bfloat16, 512) == "chunked"
