"""bf16 on XLA:CPU: diffax's dense layers hand bf16 operands to the matmul and accumulate in fp32, where a
bf16 product with a bf16 result was rewritten to convert both operands to fp32 first (YNNPACK multiplies bf16
1.5-1.9x faster than fp32 on CPUs with bf16 instructions); fp32 layers are unchanged."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import layers

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite is XLA:CPU's")


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
    """The operand dtypes of every dot in an optimised HLO text (inside fusions too)."""
    dtypes = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo)}
    return [(dtypes[a], dtypes[b]) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


def _layer_and_input(dtype):
    layer = layers.dense(48, dtype=dtype, param_dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (4, 16, 32)).astype(dtype)  # [B, L, in]
    return layer, x, nn.unbox(layer.init(jax.random.key(1), x))


def test_bf16_dense_multiplies_bf16_operands():
    layer, x, params = _layer_and_input(jnp.bfloat16)
    dots = _dot_operand_dtypes(jax.jit(layer.apply).lower(params, x).compile().as_text())
    assert dots and all(d == ("bf16", "bf16") for d in dots), dots  # plain lax.dot_general: ("f32", "f32")
    out = layer.apply(params, x)
    assert out.dtype == jnp.bfloat16
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params["params"])
    want = np.asarray(x, np.float32) @ p["kernel"] + p["bias"]  # exact products, fp32 sums
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=2e-2)  # bf16 rounding


def test_fp32_dense_is_the_plain_product():
    layer, x, params = _layer_and_input(jnp.float32)
    p = params["params"]
    want = jax.jit(lambda x: (x.reshape(-1, 32) @ p["kernel"] + p["bias"]).reshape(4, 16, 48))(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(layer.apply)(params, x)), np.asarray(want))
