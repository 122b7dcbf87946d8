"""Weight-only post-training quantization of a diffax parameter tree: int8 per output channel, int4 per
channel or per group, symmetric and uniform.

    qp = quantize_params(params, bits=8)                      # every Dense / Conv kernel, CLIP's tables
    qp = quantize_params(params, bits=4, group_size=64, exclude=[r"^conv_in/", r"^conv_out/"])
    out = module.apply({"params": qp.params}, x, t)           # the same module: layers dequantise in place

Every projection and convolution in diffax is a `layers.Dense` / `layers.Conv`, whose parameter is named
`kernel`; those leaves are replaced by their stored form (`diffax.models.qtensor`: integers + fp32
`kernel_scale`). The embedding tables a `layers.Embed` looks rows up in (`EMBEDDING_TABLES`: CLIP text
encoders' token and position tables, a third of CLIP-L's weights) are stored per row the same way
(integers + `embedding_scale`). Biases, norms and the other tables stay float: they are a small share of
the weights (DiT's and the U-Nets' class tables: under 0.2 %) and the most sensitive to rounding.

The numbers come from qwix (`qwix.quantize`: absmax calibration per channel or per tile, round to nearest,
saturate), the quantization library MaxText and maxdiffusion use, so |w - dequantize(q)| <= scale / 2 for
every weight, with scale = absmax / 127.5 (int8) or absmax / 7.5 (int4) of its channel or group.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.qtensor import (EMBEDDING_SCALE, KERNEL_SCALE, dequantize_kernel, dequantize_table, pack_int4,
                                   scale_name)

Params = dict[str, Any]
Path = tuple[str, ...]

# The embedding tables whose layer is `diffax.models.layers.Embed`, which runs on a quantized table: CLIP
# text encoders' token and position tables ('/'-joined path, `re.search`). The class tables of DiT and the
# U-Nets and CLIP vision's position table are flax `nn.Embed`s, which would read integers as weights, so
# they are never chosen.
EMBEDDING_TABLES = re.compile(r"(^|/)text_model/embeddings/(token|position)_embedding/embedding$")
SCALES = (KERNEL_SCALE, EMBEDDING_SCALE)


def scale_path(path: Path) -> Path:
    """Where the scale of the quantized leaf at `path` is stored: beside it, as 'kernel_scale' or
    'embedding_scale'."""
    return path[:-1] + (scale_name(path[-1]),)


def is_table(path: Path) -> bool:
    """Whether `path` names an embedding table (an `embedding` leaf) rather than a kernel."""
    return path[-1] == "embedding"


class QuantizationError(ValueError):
    """A parameter tree or an option that cannot be quantized as asked; the message names the key."""


@flax.struct.dataclass
class QuantizedParams:
    """A parameter tree whose chosen kernels are stored as integers + `kernel_scale`.

    `params` goes straight into `module.apply({"params": qp.params}, ...)`. `shapes` records the float
    shape of every quantized kernel ('/'-joined path -> shape), which `dequantize` and the storage
    formats use; the layers do not need it.
    """
    params: Params
    bits: int = flax.struct.field(pytree_node=False)
    group_size: int | None = flax.struct.field(pytree_node=False)
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = flax.struct.field(pytree_node=False)

    @property
    def quantized(self) -> dict[str, tuple[int, ...]]:
        """'/'-joined path of each quantized kernel or embedding table -> its float shape."""
        return dict(self.shapes)


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """{('a', 'b'): leaf} from a nested dict (as `diffax.convert.rules.flatten`, which this package cannot
    import: the model layers import it, and diffax.convert imports the models)."""
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> Params:
    """Nested dict from {('a', 'b'): leaf}."""
    out: Params = {}
    for path, v in flat.items():
        node = out
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = v
    return out


MODES = {"int8": 8, "int4": 4}  # the names of the user-facing switches (sample.py --quantize, pipelines)


def mode_bits(mode: str, where: str = "quantize") -> int:
    """8 for 'int8', 4 for 'int4'; a QuantizationError naming `where` (the flag or argument) otherwise."""
    if mode not in MODES:
        raise QuantizationError(f"{where}: quantization must be one of {', '.join(MODES)}, got {mode!r}")
    return MODES[mode]


def _check_options(bits: int, group_size: int | None) -> None:
    if bits not in (4, 8):
        raise QuantizationError(f"quantize_params: bits must be 8 or 4, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
        raise QuantizationError(f"quantize_params: group_size must be an int >= 2 or None (per output "
                                f"channel), got {group_size!r}")


def _compile(patterns: Iterable[str] | None, what: str) -> list[re.Pattern]:
    out = []
    for p in patterns or ():
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise QuantizationError(f"quantize_params: {what} pattern {p!r} is not a regular expression ({e})") \
                from None
    return out


def selected(flat: Mapping[Path, Any], include: Iterable[str] | None = None,
             exclude: Iterable[str] | None = None, *, tables: bool = False) -> list[Path]:
    """The kernels `quantize_params` would quantize: leaves named `kernel` with 2+ dims (and with `tables`,
    the 2-D embedding tables `EMBEDDING_TABLES` names) whose '/'-joined path matches an `include` pattern
    (all when None) and no `exclude` pattern (`re.search`). A pattern that matches none of them is an error
    naming it, since it is most likely a typo."""
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    kernels = [p for p, v in flat.items() if (p[-1] == "kernel" and np.ndim(v) >= 2) or
               (tables and is_table(p) and np.ndim(v) == 2 and EMBEDDING_TABLES.search("/".join(p)))]
    names = {p: "/".join(p) for p in kernels}
    for pattern in inc + exc:
        if not any(pattern.search(n) for n in names.values()):
            raise QuantizationError(f"quantize_params: pattern {pattern.pattern!r} matches no kernel "
                                    f"(kernels look like {next(iter(names.values()), '<none>')!r})")
    return [p for p in kernels if (not inc or any(r.search(names[p]) for r in inc))
            and not any(r.search(names[p]) for r in exc)]


def stored_rows(k: int, bits: int, group_size: int | None) -> tuple[int, int]:
    """(Kp, G): the stored rows and scale groups of a kernel with K contraction rows.

    G = ceil(K / group_size) groups of equal size gs = ceil(K / G) (even for int4), so no group is larger
    than `group_size` and the zero padding Kp - K = G * gs - K stays below 2 G rows: a layer with K = 288
    and group_size=128 gets 3 groups of 96 rather than 384 rows.
    """
    groups = -(-k // group_size) if group_size else 1
    gs = -(-k // groups)
    if bits == 4:
        gs += gs % 2
    return groups * gs, groups


def quantize_kernel(w: Any, bits: int, group_size: int | None = None, *, name: str = "kernel"
                    ) -> tuple[jax.Array, jax.Array]:
    """(stored kernel, kernel_scale) of one float kernel [..., out] (layout in `diffax.models.qtensor`)."""
    try:
        import qwix  # noqa: F401  (used by _quantize_jit; checked here for a clear message)
    except ImportError:
        raise QuantizationError("quantize_params needs qwix: pip install 'diffax[quant]'") from None
    _check_options(bits, group_size)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise QuantizationError(f"{name}: a {w.dtype} kernel is not a float weight (already quantized?)")
    q, scale, finite = _quantize_jit(w, bits, group_size)
    if not bool(finite):
        raise QuantizationError(f"{name}: holds NaN or inf; its scale would be meaningless")
    return q, scale


def quantize_table(w: Any, bits: int, group_size: int | None = None, *, name: str = "embedding"
                   ) -> tuple[jax.Array, jax.Array]:
    """(stored table, embedding_scale) of one float embedding table [N, D], one scale per row or per group
    of at most `group_size` columns (layout in `diffax.models.qtensor`): the kernel quantization of the
    transposed table, stored transposed back so that a lookup gathers rows."""
    if np.ndim(w) != 2:
        raise QuantizationError(f"{name}: an embedding table is [N, D], got shape {np.shape(w)}")
    q, scale = quantize_kernel(jnp.asarray(w).T, bits, group_size, name=name)  # [Dp(/2), N], [G, N]
    return q.T, scale.T


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_jit(w: jax.Array, bits: int, group_size: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(stored kernel, scale, whether every weight is finite): one program per kernel shape, since op by op
    qwix's dozen small ops (and the finiteness check) would each compile per shape."""
    import qwix
    out = w.shape[-1]
    k = math.prod(w.shape[:-1])
    kp, groups = stored_rows(k, bits, group_size)
    w2 = jnp.pad(w.astype(jnp.float32).reshape(k, out), ((0, kp - k), (0, 0)))  # zeros leave absmax alone
    qtype = jnp.int8 if bits == 8 else jnp.int4
    tiles = {0: kp // groups} if groups > 1 else {}
    qa = qwix.quantize(w2, qtype, channelwise_axes=(1,), tiled_axes=tiles)  # qvalue [Kp, out], scale [G, out]
    q = qa.qvalue.astype(jnp.int8)
    return (q if bits == 8 else pack_int4(q)), qa.scale.astype(jnp.float32), jnp.isfinite(w).all()


def quantize_params(params: Params, bits: int = 8, group_size: int | None = None, *,
                    include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                    embeddings: bool = True) -> QuantizedParams:
    """Weight-only quantization of the Dense / Conv kernels (and embedding tables) of a diffax parameter tree.

    Args:
        params: a plain nested dict (`module.init(...)["params"]`, `diffax.convert.load`'s params).
        bits: 8 (int8) or 4 (int4, two per byte).
        group_size: None for one scale per output channel; else the most contraction rows one scale covers
            (e.g. 64 or 128 for int4; see `stored_rows` for how a kernel is cut into equal groups).
        include, exclude: regular expressions searched in each kernel's '/'-joined path
            ('down_blocks_0/resnets_0/conv1/kernel'); see `selected`.
        embeddings: also quantize the embedding tables of `EMBEDDING_TABLES` (CLIP's token and position
            tables), per row (group_size None) or per group of columns, as `quantize_table`.
    Returns:
        QuantizedParams whose `.params` has the same keys plus `kernel_scale` beside each quantized kernel
        and `embedding_scale` beside each quantized table.
    Raises:
        QuantizationError naming the option or the key: bad bits / group_size / pattern, a kernel that is
        not a float array or holds NaN / inf.
    """
    _check_options(bits, group_size)
    flat = flatten(params)
    chosen = selected(flat, include, exclude, tables=embeddings)
    out = dict(flat)
    shapes = []
    for path in chosen:
        name = "/".join(path)
        quantize = quantize_table if is_table(path) else quantize_kernel
        out[path], out[scale_path(path)] = quantize(flat[path], bits, group_size, name=name)
        shapes.append((name, tuple(int(d) for d in np.shape(flat[path]))))
    return QuantizedParams(unflatten(out), bits, group_size, tuple(shapes))


def dequantize_leaf(path: Path, stored: Any, scale: Any, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
    """The float kernel or table at `path` from its stored form (`dequantize_kernel` / `dequantize_table`)."""
    return (dequantize_table if is_table(path) else dequantize_kernel)(stored, scale, shape, dtype)


def dequantize(qp: QuantizedParams, dtype: Any = jnp.float32) -> Params:
    """The float parameter tree back: each quantized kernel as `dequantize_kernel` makes it in the layers,
    each quantized table as its rows are looked up."""
    flat = flatten(qp.params)
    out = {p: v for p, v in flat.items() if p[-1] not in SCALES}
    for name, shape in qp.shapes:
        path = tuple(name.split("/"))
        out[path] = dequantize_leaf(path, flat[path], flat[scale_path(path)], shape, dtype)
    return unflatten(out)


def device_bytes(tree: Any) -> int:
    """Bytes the leaves of `tree` take: on device for jax arrays, `nbytes` for numpy / abstract ones."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            total += leaf.on_device_size_in_bytes()
        else:
            total += math.prod(np.shape(leaf)) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_quantized(abstract: Params, bits: int = 8, group_size: int | None = None, *,
                       include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                       embeddings: bool = True) -> Params:
    """The `jax.ShapeDtypeStruct` tree `quantize_params` would return for an abstract float tree
    (`diffax.models.abstract_params(config)`): sizes of full-size models without allocating them."""
    _check_options(bits, group_size)
    flat = flatten(abstract)
    out = dict(flat)
    for path in selected(flat, include, exclude, tables=embeddings):
        shape = flat[path].shape
        table = is_table(path)
        k, o = (shape[1], shape[0]) if table else (math.prod(shape[:-1]), shape[-1])  # a table: transposed
        kp, groups = stored_rows(k, bits, group_size)
        rows, dtype = (kp, jnp.int8) if bits == 8 else (kp // 2, jnp.uint8)
        stored, scale = (rows, o), (groups, o)
        out[path] = jax.ShapeDtypeStruct(stored[::-1] if table else stored, dtype)
        out[scale_path(path)] = jax.ShapeDtypeStruct(scale[::-1] if table else scale, jnp.float32)
    return unflatten(out)


def is_quantized(params: Params) -> bool:
    """Whether any layer of `params` holds a stored (integer) kernel or embedding table."""
    return any(p[-1] in SCALES for p in flatten(params))


def quantized_paths(params: Params) -> list[Path]:
    """The paths of the stored (integer) kernels and tables of a plain parameter tree: those with a
    `kernel_scale` / `embedding_scale` beside them."""
    return [p[:-1] + (p[-1][:-len("_scale")],) for p in flatten(params) if p[-1] in SCALES]


def quantized_specs(specs: Params, qp: QuantizedParams | Params) -> Params:
    """The logical PartitionSpecs of `qp.params` (or of a plain quantized tree, as a pipeline holds it) from
    those of the float tree (`logical_specs(config)`): a quantized kernel [rows, out] and its `kernel_scale`
    [G, out] keep the float kernel's output axis and replicate the rows (padded and packed, they need not
    divide a mesh axis the float input axis did); a quantized table [N, cols] and its `embedding_scale`
    [N, G] keep the table's row axis and replicate the columns, for the same reason."""
    from jax.sharding import PartitionSpec
    flat = flatten(specs)  # a PartitionSpec is a tuple, so it is a leaf here
    paths = ([tuple(name.split("/")) for name, _ in qp.shapes] if isinstance(qp, QuantizedParams)
             else quantized_paths(qp))
    for path in paths:
        axes = tuple(flat[path])
        if is_table(path):
            spec = PartitionSpec(axes[0] if axes else None, None)
        else:
            spec = PartitionSpec(None, axes[-1] if axes else None)
        flat[path] = flat[scale_path(path)] = spec
    return unflatten(flat)
