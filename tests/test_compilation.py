"""diffax.compilation: the seconds of a first call that go to lowering and XLA's compiler, and the persistent
cache that spares a later process the compiler."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from diffax import compilation


def test_counts_the_compiles_inside_the_block_only():
    x = jnp.arange(7.0)
    with compilation.compile_seconds() as seconds:
        jax.block_until_ready(jax.jit(lambda a: jnp.sin(a) * 3.0 + 1.0)(x))
    assert seconds["trace"] > 0 and seconds["lower"] > 0 and seconds["compile"] > 0
    inside = dict(seconds)
    jax.block_until_ready(jax.jit(lambda a: jnp.cos(a) - 2.0)(x))  # a new program after the block
    assert seconds == inside


def test_a_cached_call_adds_nothing():
    f = jax.jit(lambda a: a * 5.0 - 1.0)
    x = jnp.ones(3)
    jax.block_until_ready(f(x))
    with compilation.compile_seconds() as seconds:
        jax.block_until_ready(f(x))
    assert seconds == {"trace": 0.0, "lower": 0.0, "compile": 0.0}


def _cache_dir_in_a_new_process(env: dict[str, str], folder: str) -> list[str]:
    """[what enable_persistent_cache(folder) returned, jax's cache folder after it] in a fresh interpreter
    (jax's config is process-wide)."""
    code = ("import jax; from diffax.compilation import enable_persistent_cache as e; "
            f"print(e({folder!r})); print(jax.config.jax_compilation_cache_dir)")
    return subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, check=True).stdout.split()


def test_persistent_cache_keeps_the_users_folder_and_turns_off():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "DIFFAX_XLA_CACHE")}
    assert _cache_dir_in_a_new_process(env, "/tmp/diffax-x") == ["/tmp/diffax-x"] * 2
    mine = {**env, "JAX_COMPILATION_CACHE_DIR": "/tmp/diffax-mine"}
    assert _cache_dir_in_a_new_process(mine, "/tmp/diffax-x") == ["/tmp/diffax-mine"] * 2
    assert _cache_dir_in_a_new_process({**env, "DIFFAX_XLA_CACHE": "0"}, "/tmp/diffax-x") == ["None", "None"]


def test_train_and_sample_scripts_turn_the_cache_on(tmp_path):
    """train.py and sample.py (a workdir) use ~/.cache/diffax/xla: each script's main runs in a new process
    with its work replaced by a print of jax's cache folder at the moment the work would start."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "DIFFAX_XLA_CACHE")}
    env.update(HOME=str(tmp_path), JAX_PLATFORMS="cpu")
    show = "lambda *a, **k: sys.exit(print(jax.config.jax_compilation_cache_dir))"
    scripts = {
        "train": (["--config=configs/digits.py", f"--workdir={tmp_path / 'run'}"], "train_and_evaluate",
                  "flags_parser=train.parse_flags"),
        "sample": ([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'grid.png'}"], "load", ""),
    }
    for name, (flags, work, parser) in scripts.items():
        code = (f"import sys, jax; sys.argv = [{name + '.py'!r}, *{flags!r}]; import {name}; "
                f"{name}.{work} = {show}; from absl import app; app.run({name}.main, {parser})")
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
        assert out.stdout.split() == [str(tmp_path / ".cache" / "diffax" / "xla")], (name, out.stderr[-2000:])
