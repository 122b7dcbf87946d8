"""diffax.compile_time: the seconds of a first call that go to lowering and XLA's compiler."""
import jax
import jax.numpy as jnp

from diffax import compile_time


def test_counts_the_compiles_inside_the_block_only():
    x = jnp.arange(7.0)
    with compile_time.compile_seconds() as seconds:
        jax.block_until_ready(jax.jit(lambda a: jnp.sin(a) * 3.0 + 1.0)(x))
    assert seconds["trace"] > 0 and seconds["lower"] > 0 and seconds["compile"] > 0
    inside = dict(seconds)
    jax.block_until_ready(jax.jit(lambda a: jnp.cos(a) - 2.0)(x))  # a new program after the block
    assert seconds == inside


def test_a_cached_call_adds_nothing():
    f = jax.jit(lambda a: a * 5.0 - 1.0)
    x = jnp.ones(3)
    jax.block_until_ready(f(x))
    with compile_time.compile_seconds() as seconds:
        jax.block_until_ready(f(x))
    assert seconds == {"trace": 0.0, "lower": 0.0, "compile": 0.0}
