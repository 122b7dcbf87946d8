"""Compiled pipeline programs kept on disk, so that a new process skips tracing, lowering and compiling.

    pipe = diffax.pipelines.load("sd-folder", executable_cache=True)
    images = pipe("a photo of a cat")   # the first process compiles and writes the executable; later ones load it

XLA's persistent compilation cache (which `load` turns on) is keyed by the lowered program, so a warm process
still traces and lowers a whole sampling loop before the cache answers; on a CPU that is most of a warm start
(SD 1.5's UNet: 1.4 s of 1.8 s). This cache keys a program by what decides it instead, and stores the
executable itself (`jax.experimental.serialize_executable`):
- the pipeline class, the program's static choices (its key: sampler steps, guidance on/off, image size...),
  the scheduler's class and config, every component's module (its config, dtype, attention backend), the
  pipeline's model_index options and dtype;
- the inputs' shapes, dtypes and shardings, the parameter tree among them (so quantized or LoRA-extended
  weights get their own entry), the mesh (axis names and sizes, device kinds) and the logical-axis rules;
- the jax and jaxlib versions, the backend and its platform version, XLA_FLAGS and the jax options that
  change programs, and a digest of diffax's own source files, so that an upgrade or an edit recompiles.
An entry that cannot be read back (damaged, or written by another build) is removed with a warning and the
program is compiled again. Serialised executables hold one process's devices, so with several processes the
cache stands aside and the program is jitted as usual. It lives under `cache_dir/executables` (see
`diffax.pipelines.cache.cache_root`); entries are whole programs, 10-100 MB for a full-size model.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
from jax.experimental.compilation_cache import compilation_cache

import diffax

FORMAT = 1  # bump when the entry layout changes


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A digest of every .py file of the installed diffax package (read once per process)."""
    root = Path(diffax.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _aval(x: Any) -> list[Any]:
    sharding = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    return [list(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)), str(spec)]


def environment() -> dict[str, Any]:
    """What, beyond the program's own identity, decides the executable XLA builds."""
    return {
        "format": FORMAT, "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
        "platform": jax.default_backend(), "platform_version": jax.devices()[0].client.platform_version,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "diffax": source_digest(),
    }


def entry_key(identity: Mapping[str, Any], args: tuple[Any, ...]) -> str:
    """The file name of a program: a digest of its identity, its inputs' avals and the environment."""
    leaves, tree = jax.tree.flatten(args)
    blob = json.dumps({"identity": identity, "tree": str(tree), "avals": [_aval(x) for x in leaves],
                       "environment": environment()}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@contextlib.contextmanager
def persistent_cache_off() -> Iterator[None]:
    """Compiles inside bypass XLA's persistent compilation cache. An executable that jax read back from that
    cache does not serialise whole on XLA:CPU (a new process then misses the code of some fused kernels), so
    the executables stored here come from a real compile."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once per process whether the cache is used: decide again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


class ExecutableCache:
    """A folder of serialised executables, one file per program (see the module doc)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self.hits = 0    # programs loaded from disk in this process
        self.misses = 0  # programs compiled (and written) in this process

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.exe"

    def load(self, key: str) -> Any | None:
        """The executable stored under `key`, or None (absent, or unreadable: then removed with a warning)."""
        path = self.path(key)
        if not path.is_file():
            return None
        from jax.experimental.serialize_executable import deserialize_and_load
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            return deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # a damaged file, or one another jax build wrote: compile again
            warnings.warn(f"{path}: compiled program could not be loaded ({type(e).__name__}: {e}); "
                          f"removing it and compiling again")
            path.unlink(missing_ok=True)
            return None

    def store(self, key: str, compiled: Any) -> None:
        """Writes `compiled` under `key` atomically (a reader never sees half a file); a program that cannot
        be serialised is simply not cached."""
        from jax.experimental.serialize_executable import serialize
        try:
            blob = pickle.dumps(serialize(compiled))
        except Exception as e:  # e.g. host callbacks that have no serialised form on this backend
            warnings.warn(f"compiled program not cached in {self.folder}: {type(e).__name__}: {e}")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, self.path(key))

    def wrap(self, jitted: Callable, identity: Mapping[str, Any]) -> Callable:
        """`jitted` (a jax.jit-like function with `.lower`) called through the cache: per distinct input
        avals, the stored executable or a fresh compile that is then stored."""
        programs: dict[str, Any] = {}

        def call(*args: Any) -> Any:
            if jax.process_count() > 1:
                return jitted(*args)
            key = entry_key(identity, args)
            if key in programs:
                return programs[key](*args)
            compiled = self.load(key)
            if compiled is not None:
                try:
                    out = compiled(*args)
                except jax.errors.JaxRuntimeError as e:  # loaded, but cannot run here: compile it afresh
                    warnings.warn(f"{self.path(key)}: compiled program failed to run ({str(e).splitlines()[0]}); "
                                  f"removing it and compiling again")
                    self.path(key).unlink(missing_ok=True)
                else:
                    self.hits += 1
                    programs[key] = compiled
                    return out
            with persistent_cache_off():
                compiled = jitted.lower(*args).compile()
            self.store(key, compiled)
            self.misses += 1
            programs[key] = compiled
            return compiled(*args)

        return call
