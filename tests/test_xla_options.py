"""diffax's compiler options: on a CPU, convolutions leave YNNPACK and matmuls stay in it; the model
programs diffax compiles carry them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import parallel, xla_options

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's")


def _conv_then_dot(x: jax.Array, w: jax.Array, m: jax.Array) -> jax.Array:  # [1, 16, 16, 64] -> [256, 64]
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y.reshape(-1, 64) @ m)


def _args():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((1, 16, 16, 64)), jnp.float32),
            jnp.asarray(rng.standard_normal((3, 3, 64, 64)) * 0.05, jnp.float32),
            jnp.asarray(rng.standard_normal((64, 64)) * 0.1, jnp.float32))


def _ops(hlo: str) -> tuple[int, int]:
    """(convolutions run by XLA itself, YNNPACK fusions) in an optimised HLO text: the ops of its ENTRY
    computation (a convolution inside a YNNPACK fusion sits in the fusion's own computation)."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    return entry.count(" convolution("), entry.count("__ynn_fusion")


def test_cpu_options_move_convolutions_out_of_ynnpack_and_keep_dots_in():
    options = xla_options.program_options("cpu")
    assert options, "this jaxlib rejected the option: diffax's CPU convolutions run on YNNPACK again"
    args = _args()
    default = jax.jit(_conv_then_dot).lower(*args).compile().as_text()
    tuned = jax.jit(_conv_then_dot, compiler_options=options).lower(*args).compile().as_text()
    assert _ops(default)[0] == 0  # jaxlib's default: the convolution inside a YNNPACK fusion
    assert _ops(tuned)[0] == 1 and _ops(tuned)[1] >= 1  # XLA's convolution; the matmul still YNNPACK's
    np.testing.assert_allclose(jax.jit(_conv_then_dot, compiler_options=options)(*args),
                               jax.jit(_conv_then_dot)(*args), rtol=1e-5, atol=1e-5)


def test_programs_compiled_by_jit_with_rules_carry_the_options():
    mesh, rules = parallel.mesh_from_config({"data": -1})
    hlo = parallel.jit_with_rules(_conv_then_dot, mesh, rules).lower(*_args()).compile().as_text()
    assert _ops(hlo)[0] == 1


def test_xla_options_jit_carries_the_options():
    hlo = xla_options.jit(_conv_then_dot).lower(*_args()).compile().as_text()
    assert _ops(hlo)[0] == 1


def test_no_options_off_cpu():
    assert xla_options.program_options("gpu") == {} and xla_options.program_options("tpu") == {}
