"""`layers.materialize`: the residual stream between blocks is computed once on XLA:CPU, so a train step's
fusions do not grow with the depth (they did: every consumer recomputed all earlier blocks' additions), and
the values and gradients are exactly those of the identity."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import build_model
from diffax.models.layers import materialize


def _largest_fusion(compiled_text: str) -> int:
    """Operand count of the largest fusion in an optimised HLO module."""
    return max(m.group(1).count("%") for m in re.finditer(r" = \S+ fusion\((.*?)\), kind=", compiled_text))


def _dit_grad_fusion(depth: int) -> int:
    model = build_model(dict(name="DiTTransformer2DModel", sample_size=8, patch_size=2, in_channels=4,
                             num_attention_heads=2, attention_head_dim=8, num_layers=depth, num_embeds_ada_norm=4))
    x = jnp.zeros((2, 8, 8, 4))
    t, y = jnp.array([3, 500]), jnp.array([0, 1])
    params = jax.eval_shape(lambda k: model.init(k, x, t, class_labels=y), jax.random.key(0))["params"]

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, t, class_labels=y) ** 2)

    return _largest_fusion(jax.jit(jax.grad(loss)).lower(params).compile().as_text())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fusion behaviour is XLA:CPU's")
def test_dit_gradient_fusions_do_not_grow_with_depth():
    # Without materialize the largest fusion of this gradient grew by ~25 operands a block (52 at depth 2):
    # the whole residual chain was copied into every consumer.
    shallow, deep = _dit_grad_fusion(2), _dit_grad_fusion(6)
    assert deep <= shallow + 8, (shallow, deep)


def test_materialize_is_the_identity_in_value_and_gradient():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
    x = x.at[0, 0].set(jnp.inf).at[1, 1].set(-jnp.inf).at[2, 2].set(jnp.nan).at[0, 1].set(-0.0)
    out = jax.jit(materialize)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    assert np.signbit(np.asarray(out)[0, 1])  # -0.0 stays -0.0
    ct = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)), jnp.float32)
    _, vjp = jax.vjp(materialize, x)
    np.testing.assert_array_equal(np.asarray(vjp(ct)[0]), np.asarray(ct))
    ints = jnp.arange(4)
    assert materialize(ints) is ints
