"""Device mesh, logical-axis rules and shardings: how the same code runs on 1 CPU or a TPU pod.

Models name their parameter axes logically ('embed', 'mlp', 'heads', 'conv_out', ...; see
diffax/models/layers.py). A rule table maps each logical name to a mesh axis, so data parallelism, FSDP
and tensor parallelism are a choice of mesh shape and rules, not a code change:

    mesh, rules = mesh_from_config(config.mesh)               # {"data": -1, "fsdp": 1, "tensor": 1, "rules": ...}
    # or across slices: {"data": 1, "fsdp": 8, "dcn_data": 4} is data 4 (one per slice) x fsdp 8 (within)
    param_shardings = logical_shardings(logical_specs, mesh, rules)  # NamedSharding per parameter
    step = jit_with_rules(train_step, mesh, rules, in_shardings=...)  # activation constraints take effect
    batch = shard_batch(local_batch, mesh)                     # global jax.Array, rows over data x fsdp

Parameters get their layout from `logical_shardings`; activations from the models' `nn.with_logical_constraint`
calls, which only take effect while tracing under a mesh and the rules (`use_rules`; `jit_with_rules` enters
both around every call and `.lower`). Outside them the constraints return x unchanged.

Multi-host: call `initialize_distributed()` first; each process feeds its own rows (see diffax.data) and
`shard_batch` assembles the global array with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from diffax import xla_options

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical name -> mesh axes. Batch rows go over data and fsdp; FSDP shards weights on their input ('embed'
# / 'conv_in') dimension; tensor parallelism splits the hidden / head / output-channel dimension.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("activation_channels", None),  # channels of NHWC feature maps: replicated, every conv reads them all
)


class MeshConfigError(ValueError):
    """A mesh shape or rule table that cannot work: the message names the config key."""


def _mesh_axes(value: Any, where: str) -> MeshAxes:
    names = [value] if value is None or isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names:
        raise MeshConfigError(f"{where} maps to {value!r}; expected null, a mesh axis name or a list of them")
    for name in names:
        if name is not None and name not in MESH_AXES:
            raise MeshConfigError(f"{where} names unknown mesh axis {name!r}; the mesh axes are {MESH_AXES}")
    if value is None or isinstance(value, str):
        return value
    if None in names:
        raise MeshConfigError(f"{where} maps to {value!r}; null cannot be one of several mesh axes")
    return tuple(names)


def parse_rules(rules: Any, where: str = "config key 'mesh.rules'") -> Rules:
    """The logical-axis rule table as a tuple of (logical name, mesh axes) pairs, checked.

    Accepts what a config holds: a sequence of pairs (tuples, or lists after the JSON round trip of a saved
    config) or a mapping {logical name: mesh axes}. Mesh axes are null (replicated), one of `MESH_AXES` or a
    list of them. As in Flax, the first rule for a name whose mesh axes are still free in that array wins.
    """
    if hasattr(rules, "items"):  # a dict, or the ConfigDict a config makes of one (keeps the order)
        items = list(rules.items())
    elif isinstance(rules, (list, tuple)):
        items = rules
    else:
        raise MeshConfigError(f"{where}: expected a list of (logical name, mesh axes) pairs, got {rules!r}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
            raise MeshConfigError(f"{where}: entry {i} is {item!r}, not a (logical name, mesh axes) pair")
        out.append((item[0], _mesh_axes(item[1], f"{where}: rule {item[0]!r}")))
    return tuple(out)


def _sizes(shape: Mapping[str, int], prefix: str, allow_all: bool) -> list[int]:
    """The axis sizes of `shape` in MESH_AXES order (missing: 1), checked."""
    sizes = [shape.get(a, 1) for a in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
                size < 1 and not (allow_all and size == -1)):
            raise MeshConfigError(f"mesh.{prefix}{axis} must be a positive int{' or -1' if allow_all else ''}, "
                                  f"got {size!r}")
    return [int(s) for s in sizes]


def _granules(devices: Sequence[jax.Device]) -> tuple[list[int], bool]:
    """The slice (or, where devices have no slice index, process) of each device: the units that DCN, the
    slower network between slices or hosts, connects. Returns (granule ids, whether they are processes)."""
    slices = [getattr(d, "slice_index", None) for d in devices]
    if None not in slices and len(set(slices)) > 1:
        return slices, False
    return [d.process_index for d in devices], True


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None) -> Mesh:
    """A mesh over `devices` (default: all, across hosts) with axes `MESH_AXES`.

    `shape` holds the axis sizes within one slice (ICI, the fast interconnect; one size may be -1: all
    remaining devices of a slice); `dcn` the sizes across slices (multi-slice TPU) or, for devices without a
    slice index (GPUs, CPUs), across processes. Each mesh axis then has size shape x dcn, with the dcn part
    outermost, so that only the axes given dcn sizes cross the slow network: usually data (gradient
    all-reduce once a step) and never tensor. One slice: `jax.make_mesh`, which orders devices by the
    physical topology (TPU rings); several: `mesh_utils.create_hybrid_device_mesh`. Axes are Auto:
    shardings come from jit's in/out shardings and the logical constraints.
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise MeshConfigError(f"mesh axes must be among {MESH_AXES}, got unknown {sorted(unknown)}")
    unknown = set(dcn or {}) - set(MESH_AXES)
    if unknown:
        raise MeshConfigError(f"dcn mesh axes must be among {MESH_AXES}, got unknown {sorted(unknown)}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = _sizes(shape, "", allow_all=True)
    dcn_sizes = _sizes(dcn or {}, "dcn_", allow_all=False)
    num_granules = int(np.prod(dcn_sizes))
    described = dict(zip(MESH_AXES, sizes))
    if num_granules > 1:
        described.update({f"dcn_{a}": n for a, n in zip(MESH_AXES, dcn_sizes) if n > 1})
    if sizes.count(-1) > 1:
        raise MeshConfigError(f"at most one mesh axis may be -1, got {described}")
    if len(devices) % num_granules:
        raise MeshConfigError(f"mesh {described}: the dcn sizes multiply to {num_granules}, which does not "
                              f"divide the {len(devices)} devices")
    per_granule = len(devices) // num_granules
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if per_granule % known:
            raise MeshConfigError(f"{per_granule} devices{' per slice' if num_granules > 1 else ''} do not "
                                  f"divide into mesh {described}")
        sizes[sizes.index(-1)] = per_granule // known
    if int(np.prod(sizes)) * num_granules != len(devices):
        raise MeshConfigError(f"mesh {described} needs {int(np.prod(sizes)) * num_granules} devices, "
                              f"have {len(devices)}")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if num_granules == 1:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
    granules, by_process = _granules(devices)
    if len(set(granules)) != num_granules:
        unit = "processes" if by_process else "slices"
        raise MeshConfigError(f"mesh {described}: the dcn sizes multiply to {num_granules}, but the "
                              f"{len(devices)} devices are in {len(set(granules))} {unit}")
    array = mesh_utils.create_hybrid_device_mesh(sizes, dcn_sizes, devices, process_is_granule=by_process)
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def mesh_from_config(mesh_config: Mapping[str, Any]) -> tuple[Mesh, Rules]:
    """(mesh, rules) from a run config's `mesh` block: the axis sizes within a slice (`data`, `fsdp`,
    `tensor`), across slices or processes (`dcn_data`, `dcn_fsdp`, `dcn_tensor`; default 1) and `rules`
    (default `DEFAULT_RULES`)."""
    block = dict(mesh_config.to_dict() if hasattr(mesh_config, "to_dict") else mesh_config)
    rules = parse_rules(block.pop("rules", DEFAULT_RULES))
    dcn = {key[len("dcn_"):]: block.pop(key) for key in list(block) if key.startswith("dcn_")}
    return make_mesh(block, dcn=dcn), rules


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Within: `nn.with_logical_constraint` maps logical names through `rules` onto `mesh`. It must be
    entered where jit traces (around the call of a jitted function), not inside the traced function."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def jit_with_rules(fn: Callable, mesh: Mesh, rules: Rules = DEFAULT_RULES, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` traced (on call and on `.lower`) under `use_rules(mesh, rules)`, so the
    models' activation constraints are part of the program, and compiled with diffax's options for the
    mesh's platform (`xla_options.program_options`) unless `jit_kwargs` has compiler_options."""
    jit_kwargs.setdefault("compiler_options", xla_options.program_options(mesh.devices.flat[0].platform))
    jitted = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with use_rules(mesh, rules):
            return jitted(*args, **kwargs)

    def lower(*args, **kwargs):
        with use_rules(mesh, rules):
            return jitted.lower(*args, **kwargs)

    call.lower = lower
    return call


def _fit(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """`sharding` with every dimension that its mesh axes do not divide left whole (replicated)."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if shape[i] % int(np.prod([sharding.mesh.shape[a] for a in names])):
            spec[i] = None
    return NamedSharding(sharding.mesh, P(*spec))


def logical_shardings(logical_specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, shapes: Any = None) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs (from `nn.get_partition_spec`).

    With `shapes` (the same tree of arrays or ShapeDtypeStructs), a dimension that its mesh axes do not
    divide stays whole: an image model's 1- or 3-channel first and last convolutions, say, under FSDP.
    """
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
    if shapes is None:
        return shardings
    return jax.tree.map(lambda sharding, x: _fit(sharding, x.shape), shardings, shapes)


def activation_spec(logical_axes: Sequence[str | None], shape: Sequence[int]) -> P | None:
    """The PartitionSpec that the mesh and rules in effect (`use_rules`) give an activation of `shape` whose
    dimensions have these logical names, a dimension that its mesh axes do not divide left whole; None
    outside a mesh or where nothing is split. For code that must run per shard (`jax.shard_map` around a
    Pallas kernel, which XLA cannot partition) while tracing."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = list(nn.logical_to_mesh_axes(tuple(logical_axes)))
    for i, axes in enumerate(spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if shape[i] % int(np.prod([mesh.shape[a] for a in names])):
            spec[i] = None
    if all(axes is None for axes in spec):
        return None
    return P(*spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device (scalars, RNG keys, small tables)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data and fsdp mesh axes."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (the number of batch shards)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_array(tree: Any, sharding: NamedSharding) -> Any:
    """Global jax.Arrays laid out by `sharding` from a tree of host arrays that every process holds whole
    (labels, sample indices, keys' data); each process places only the shards its devices own, so this is
    what a multi-process jitted call needs instead of numpy inputs."""
    def place(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(place, tree)


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's rows of a batch (numpy tree) -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def _detected_cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process cluster `jax.distributed.initialize()` can configure by itself here, or None.

    jax has no public "is a cluster present" query, and its private detectors have side effects (GCE
    metadata requests, Kubernetes API clients) and say nothing of the process count. So this reads only
    the variables jax 0.10's detectors (jax._src.clusters) read, and asks for more than one process where
    the launcher says how many: a one-task `sbatch` script or a plain `mpirun -n 1` stays single-process.
    """
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    # A Cloud TPU VM (jax found libtpu and TPU chips when it was imported): jax reads the slice's workers
    # from TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES (GKE), MEGASCALE_* (multislice) or the VM's
    # metadata (GCE); one host is a cluster of one process.
    from jax._src import cloud_tpu_init  # private: jax has no public query for this
    if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
        return "Cloud TPU"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in environ for v in slurm) and int(environ["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        if "OMPI_MCA_orte_hnp_uri" not in environ:  # Open MPI 5 dropped ORTE, which jax reads
            raise ValueError("Open MPI launched this process without OMPI_MCA_orte_hnp_uri (Open MPI >= 5), "
                             "which jax cannot read: set DIFFAX_COORDINATOR=host:port, DIFFAX_NUM_PROCESSES "
                             "and DIFFAX_PROCESS_ID (e.g. from OMPI_COMM_WORLD_RANK)")
        return "Open MPI"
    # An indexed Job (JobSet's workers): jax finds its peers through the Kubernetes API.
    if "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ:
        if importlib.util.find_spec("kubernetes") is None:
            raise ValueError("a Kubernetes indexed Job needs the `kubernetes` package for jax to find its "
                             "peers: pip install 'jax[k8s]', or set DIFFAX_COORDINATOR / DIFFAX_NUM_PROCESSES / "
                             "DIFFAX_PROCESS_ID")
        return "Kubernetes"
    return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> str | None:
    """Starts multi-host JAX when this process is one of several; returns what started it, or None.

    Explicit values win: the arguments, else DIFFAX_COORDINATOR (host:port of process 0) /
    DIFFAX_NUM_PROCESSES / DIFFAX_PROCESS_ID; jax fills in any left out from the cluster. Without them, a
    cluster jax can configure by itself (Cloud TPU VMs, SLURM or Open MPI with more than one task, a
    Kubernetes indexed Job, JAX_COORDINATOR_ADDRESS) gets `jax.distributed.initialize()` with no arguments.
    A single process outside a cluster does nothing. On CPU, collectives go through gloo.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("DIFFAX_COORDINATOR") or None
    for name, value in (("DIFFAX_NUM_PROCESSES", num_processes), ("DIFFAX_PROCESS_ID", process_id)):
        if value is None and env.get(name) and not env[name].strip().isdigit():
            raise ValueError(f"environment variable {name} must be a non-negative integer, got {env[name]!r}")
    if num_processes is None and env.get("DIFFAX_NUM_PROCESSES"):
        num_processes = int(env["DIFFAX_NUM_PROCESSES"])
    if process_id is None and env.get("DIFFAX_PROCESS_ID"):
        process_id = int(env["DIFFAX_PROCESS_ID"])
    given = {"DIFFAX_COORDINATOR": coordinator_address, "DIFFAX_NUM_PROCESSES": num_processes,
             "DIFFAX_PROCESS_ID": process_id}
    missing = [k for k, v in given.items() if v is None]
    cluster = _detected_cluster(env) if missing else "DIFFAX_* variables"
    if cluster is None and len(missing) < len(given):
        raise ValueError(f"multi-process start-up needs DIFFAX_COORDINATOR, DIFFAX_NUM_PROCESSES and "
                         f"DIFFAX_PROCESS_ID together; {', '.join(missing)} not set")
    if cluster is None:
        return None
    # Only the CPU client reads this; querying the backend here would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return cluster
