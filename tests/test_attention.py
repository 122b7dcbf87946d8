"""The attention backends agree with each other and with a float64 numpy softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import attention
from diffax.models.attention import dot_product_attention
from tests.jaxprs import equations


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
    assert attention.auto_backend("cpu", jnp.float32, (1, 40, 2, 64)) == "chunked"
    assert attention.CPU_KEY_CHUNK < 600 and attention.ONE_SHOT_MAX_KEYS < 600
    q, k, v = _qkv(40, 600, heads=2, batch=1)
    mask = jnp.asarray(np.arange(600) < 590)  # [Lk]: padding, broadcast over batch, heads and queries
    for backend in ("auto", "xla"):
        out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend=backend, mask=mask))(q, k, v)
        np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, np.asarray(mask)), rtol=1e-5,
                                   atol=1e-5)


def _masks(kind, heads):
    """None, or a mask [B|1, H|1, 23, 19] shared by every batch element and head, per batch element, per head."""
    if kind is None:
        return None
    if kind == "per_batch":
        return _mask(23, 19)
    band = _mask(23, 19)[:1, :1]
    if kind == "shared":
        return band
    return np.concatenate([np.roll(band, h, axis=-1) | (np.arange(19) == h) for h in range(heads)], axis=1)


@pytest.mark.parametrize("step_rows, group", [(6, 1), (12, 2)])
@pytest.mark.parametrize("mask_kind", [None, "shared", "per_batch", "per_head"])
def test_blocked_steps_by_head_group_match_numpy(monkeypatch, step_rows, group, mask_kind):
    """On a CPU the blocked path runs per batch element and per group of heads, with steps sized to
    CPU_STEP_BYTES; the mask is sliced along the axes it has. Same numbers as the float64 softmax."""
    heads = 4
    # 7-query chunks of 23 queries are 6 long; blocks of 5 of 19 keys are 5 long; D = 8.
    monkeypatch.setattr(attention, "CPU_STEP_BYTES", 4 * (5 + 8) * step_rows)
    assert attention.step_shape(heads, 23, 19, 8, chunk=7, key_chunk=5) == (group, 6)
    q, k, v = _qkv(23, 19, heads=heads)
    mask = _masks(mask_kind, heads)
    out = jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, backend="chunked", chunk_size=7, key_chunk_size=5,
        mask=None if mask is None else jnp.asarray(mask)))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    if group == 1:  # and the gradients through the loops equal the plain softmax's
        w = jax.random.normal(jax.random.key(3), q.shape)
        full = jnp.ones((1, 1, 23, 19), bool) if mask is None else jnp.asarray(mask)

        def loss(q, k, v):
            return jnp.sum(dot_product_attention(q, k, v, backend="chunked", chunk_size=7, key_chunk_size=5,
                                                 mask=None if mask is None else full) * w)

        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        want = jax.grad(_reference_loss, argnums=(0, 1, 2))(q, k, v, full, w)
        for g, r in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_step_shape_fills_the_step_budget():
    """The step sizes the CPU path picks at SD's shapes: every query of a head at once up to 4096 queries of
    64 channels, heads grouped at 1024 queries, and fewer queries for the VAE's 512-channel head."""
    assert attention.step_shape(8, 4096, 4096, 40) == (1, 4096)  # SD 1.5 at 64x64 latents
    assert attention.step_shape(10, 4096, 4096, 64) == (1, 4096)  # SDXL at 128x128 latents
    assert attention.step_shape(8, 1024, 1024, 40) == (4, 1024)
    assert attention.step_shape(20, 1024, 1024, 64) == (4, 1024)
    assert attention.step_shape(1, 4096, 4096, 512) == (1, 1366)  # three chunks; 1024 + 512 channels a row
    assert attention.step_shape(8, 4096, 4096, 40, chunk=512) == (8, 512)  # a given chunk is kept


def test_blocked_path_runs_per_shard_under_a_mesh(num_devices):
    """Under a mesh the CPU's loops over batch elements and heads run per shard (a loop along a split axis
    would gather it first); the output keeps the sharding and the numbers of the unsharded call."""
    from diffax import parallel

    if num_devices < 4:
        pytest.skip("needs 4 devices")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])
    q, k, v = _qkv(23, 19, heads=4)
    mask = jnp.asarray(_mask(23, 19))  # per batch element: split along data with q

    def attend(q, k, v):
        return dot_product_attention(q, k, v, backend="chunked", chunk_size=7, key_chunk_size=5, mask=mask)

    with parallel.use_rules(mesh):
        assert "shard_map" in str(jax.make_jaxpr(attend)(q, k, v))
    out = parallel.jit_with_rules(attend, mesh)(q, k, v)
    assert out.sharding.spec[0] in ("data", ("data", "fsdp")) and out.sharding.spec[2] == "tensor"
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


@pytest.mark.parametrize("backend, chunk_size, key_chunk_size", CASES[:2])
def test_gradient_skips_the_softmax_max(backend, chunk_size, key_chunk_size):
    """The max that keeps exp in range does not change the output, so its gradient (exactly zero) is not
    computed: differentiating it took a comparison mask over the scores and two more passes over them."""
    q, k, v = _qkv(23, 19)

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, backend=backend, chunk_size=chunk_size,
                                             key_chunk_size=key_chunk_size))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    masks = [e for e in equations(jaxpr) if e.primitive.name == "eq"]
    assert not masks, f"{backend}: the gradient compares the scores with their max: {masks[:2]}"


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


def test_auto_picks_cudnn_only_for_heads_it_takes():
    """On GPU with half-precision inputs 'auto' is cuDNN flash attention, except for heads it refuses:
    wider than 128 (SD 1.x's 160, the VAE's 512) or not a multiple of 8."""
    def pick(dtype, head_dim):
        return attention.auto_backend("gpu", dtype, (2, 64, 8, head_dim))

    assert pick(jnp.bfloat16, 64) == "cudnn"
    assert pick(jnp.bfloat16, 160) == "xla"
    assert pick(jnp.bfloat16, 512) == "xla"
    assert pick(jnp.float16, 100) == "xla"
    assert pick(jnp.float32, 64) == "xla"


def test_auto_on_gpu_runs_chunked_once_one_shot_scores_crowd_the_device():
    """fp32 (and cuDNN-refused) attention runs one shot on a GPU while its fp32 scores take at most
    1/GPU_SCORE_SHARE of the device's memory, then 'chunked': SD 1.5's 4096 tokens stay one shot on an
    80 GB device, its 16384 tokens at 1024x1024 (16 GiB of scores at batch 2) do not."""
    device = 80 << 30

    def pick(q_shape, dtype=jnp.float32, keys=None, device_bytes=device):
        return attention.auto_backend("gpu", dtype, q_shape, keys=keys, device_bytes=device_bytes)

    assert pick((2, 4096, 8, 40)) == "xla"
    assert pick((2, 16384, 8, 40)) == "chunked"
    assert pick((2, 16384, 8, 40), keys=77) == "xla"  # cross-attention: 77 keys
    assert pick((2, 16384, 8, 40), jnp.bfloat16) == "cudnn"
    assert pick((1, 65536, 1, 512), jnp.bfloat16) == "chunked"  # a VAE mid-block at 2048x2048
    assert pick((2, 16384, 8, 40), device_bytes=None) == "xla"  # a runtime that does not say
    # the boundary: scores * share against the device
    share, scores = attention.GPU_SCORE_SHARE, 4 * 2 * 8 * 4096 * 4096
    assert pick((2, 4096, 8, 40), device_bytes=scores * share) == "xla"
    assert pick((2, 4096, 8, 40), device_bytes=scores * share - 1) == "chunked"


# Splash attention runs jax's Pallas TPU kernel in interpret mode here (no TPU): the kernel's own code, so
# these check diffax's padding, scaling, layout and sharding around it, not its TPU speed.
# (Lq, Lk, head dim, block sizes): 77 tokens in one padded block with 40-wide heads padded to 128; 300
# queries over 77 text tokens in 128-blocks (3 query blocks, the last and the key block padded).
SPLASH_CASES = [(77, 77, 40, None), (300, 77, 64, 128)]


def _splash_inputs(lq, lk, dim, heads=2, batch=2, dtype=jnp.float32):
    return _qkv(lq, lk, heads=heads, dim=dim, batch=batch, dtype=dtype)


@pytest.mark.parametrize("lq, lk, dim, block", SPLASH_CASES)
def test_splash_matches_xla(lq, lk, dim, block):
    q, k, v = _splash_inputs(lq, lk, dim)
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend="splash", chunk_size=block,
                                                        key_chunk_size=block))(q, k, v)
    want = dot_product_attention(q, k, v, backend="xla")
    assert out.shape == q.shape and out.dtype == q.dtype
    # Both fp32 with an fp32 softmax: ~1e-6 apart. A padded key given any weight would be off by ~1e-1.
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_splash_gradients_match_xla():
    """The kernel's own backward pass (dq and dk/dv kernels), through the padding of queries, keys and the
    head dim: padded queries must add nothing to dk and dv."""
    q, k, v = _splash_inputs(130, 77, 40, batch=1)
    w = jax.random.normal(jax.random.key(3), q.shape)

    def loss(backend, block):
        return lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, backend=backend, chunk_size=block,
                                                             key_chunk_size=block) * w)

    got = jax.jit(jax.grad(loss("splash", 128), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss("xla", None), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_splash_runs_per_shard_under_a_mesh(num_devices):
    """Under a mesh and the default rules the kernel runs inside shard_map over batch (data) and heads
    (tensor); the output keeps that sharding and the numbers of the unsharded call."""
    from diffax import parallel

    if num_devices < 4:
        pytest.skip("needs 4 devices")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])
    q, k, v = _splash_inputs(77, 77, 40, heads=4)

    def attend(q, k, v):
        return dot_product_attention(q, k, v, backend="splash")

    with parallel.use_rules(mesh):
        assert "shard_map" in str(jax.make_jaxpr(attend)(q, k, v))
        # 3 heads do not split over tensor = 2: they stay whole on every device, the batch still splits.
        spec = parallel.activation_spec(("batch", None, "heads", None), (2, 77, 3, 40))
        assert spec[0] is not None and spec[2] is None
    assert parallel.activation_spec(("batch", None, "heads", None), q.shape) is None  # outside a mesh
    assert "shard_map" not in str(jax.make_jaxpr(attend)(q, k, v))
    out = parallel.jit_with_rules(attend, mesh)(q, k, v)
    assert out.sharding.spec[0] in ("data", ("data", "fsdp")) and out.sharding.spec[2] == "tensor"
    np.testing.assert_allclose(np.asarray(out), np.asarray(dot_product_attention(q, k, v, backend="xla")),
                               rtol=1e-5, atol=1e-5)


def test_auto_picks_splash_on_tpu_for_long_unmasked_attention():
    """On TPU 'auto' is splash for unmasked attention with at least SPLASH_MIN_QUERIES queries (SD's 64x64
    latents: 4096, self- or cross-attention over 77 text tokens); short or masked calls stay 'xla'."""
    def pick(lq, masked=False, dtype=jnp.bfloat16):
        return attention.auto_backend("tpu", dtype, (2, lq, 8, 64), masked)

    n = attention.SPLASH_MIN_QUERIES
    assert pick(4096) == pick(n, dtype=jnp.float32) == "splash"
    assert pick(n - 1) == pick(77) == "xla"
    assert pick(77, masked=True) == pick(4096, masked=True) == "xla"


def test_splash_with_a_mask_runs_xla_and_block_sizes_are_checked():
    q, k, v = _splash_inputs(23, 19, 8)
    assert attention._resolve("splash", q, k.shape[1], masked=True) == "xla"
    assert attention._resolve("splash", q, k.shape[1], masked=False) == "splash"
    with pytest.raises(ValueError, match="splash attention chunk_size .* multiple of 128"):
        dot_product_attention(q, k, v, backend="splash", chunk_size=100)
    from diffax.models import splash_attention
    assert splash_attention.block_sizes(77, 77, jnp.float32) == (128, 128)
    assert splash_attention.block_sizes(4096, 77, jnp.bfloat16) == (1024, 128)
    assert splash_attention.block_sizes(4096, 4096, jnp.float32) == (512, 512)


@pytest.mark.slow
@pytest.mark.parametrize("lq, lk, dim, block", [(300, 300, 64, None), (300, 300, 40, 128), (77, 300, 64, None),
                                                (256, 256, 128, 128)])
def test_splash_matches_xla_more_shapes(lq, lk, dim, block):
    """Self-attention at 300 tokens in one 384 block (default) and in 3 x 3 padded 128-blocks; a query
    block shorter than the key block; 256 tokens of 128-wide heads in 2 x 2 blocks, nothing padded."""
    test_splash_matches_xla(lq, lk, dim, block)


@pytest.mark.slow
def test_splash_bf16_close_to_numpy():
    q, k, v = _splash_inputs(300, 77, 64, dtype=jnp.bfloat16)
    out = dot_product_attention(q, k, v, backend="splash")
    assert out.dtype == jnp.bfloat16
    want = _numpy_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    # bf16 q (scaled in bf16), probabilities and output: a few bf16 ulps (2**-8) of the O(1) values.
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=0, atol=3e-2)


@pytest.mark.slow
def test_a_model_runs_splash_through_its_config():
    """A tiny DiT (16 tokens of two 16-wide heads) with attention_backend='splash' gives the 'xla' numbers."""
    from diffax.models.dit import DiT, DiTConfig

    small = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))  # NHWC
    t, y = jnp.array([999, 17]), jnp.array([3, 7])
    xla = DiTConfig.from_reference(**small, attention_backend="xla")
    params = DiT(xla).init(jax.random.key(1), x, t, class_labels=y)["params"]
    # Random values everywhere: DiT's zero-initialised adaLN gates would otherwise cut attention out.
    leaves, tree = jax.tree.flatten(params)
    params = tree.unflatten([0.3 * jax.random.normal(jax.random.key(i), p.shape) for i, p in enumerate(leaves)])
    outs = [jax.jit(DiT(DiTConfig.from_reference(**small, attention_backend=b)).apply)({"params": params}, x, t,
                                                                                        class_labels=y)
            for b in ("xla", "splash")]
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), rtol=1e-5, atol=1e-5)
