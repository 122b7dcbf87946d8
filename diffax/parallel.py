"""Device mesh, logical-axis rules and shardings: how the same code runs on 1 CPU or a TPU pod.

Models name their parameter axes logically ('embed', 'mlp', 'heads', 'conv_out', ...; see
diffax/models/layers.py). A rule table maps each logical name to a mesh axis, so data parallelism, FSDP
and tensor parallelism are a choice of mesh shape and rules, not a code change:

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})       # -1: all remaining devices
    param_shardings = logical_shardings(logical_specs, mesh)   # NamedSharding per parameter
    batch = shard_batch(local_batch, mesh)                     # global jax.Array, rows over data x fsdp

Multi-host: call `initialize_distributed()` first; each process feeds its own rows (see diffax.data) and
`shard_batch` assembles the global array with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Batch rows go over data and fsdp; FSDP shards weights on their input ('embed'
# / 'conv_in') dimension; tensor parallelism splits the hidden / head / output-channel dimension.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("norm", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all, across hosts) with axes `MESH_AXES`; one size may be -1."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes must be among {MESH_AXES}, got unknown {sorted(unknown)}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_shardings(logical_specs: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs (from `nn.get_partition_spec`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device (scalars, RNG keys, small tables)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data and fsdp mesh axes."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (the number of batch shards)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's rows of a batch (numpy tree) -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts multi-host JAX when asked to (arguments, or the DIFFAX_COORDINATOR / DIFFAX_NUM_PROCESSES /
    DIFFAX_PROCESS_ID variables); on TPU pods and SLURM/Kubernetes GPU clusters jax finds these itself, so
    `jax.distributed.initialize()` with no arguments is used there. A single process does nothing.

    On CPU (tests, two local processes) collectives go through gloo.
    """
    coordinator_address = coordinator_address or os.environ.get("DIFFAX_COORDINATOR")
    if num_processes is None and "DIFFAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["DIFFAX_NUM_PROCESSES"])
    if process_id is None and "DIFFAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["DIFFAX_PROCESS_ID"])
    if coordinator_address is None:
        return
    # Only the CPU client reads this; querying the backend here would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
