"""Rematerialisation of model blocks: which activations a block keeps for the backward pass.

A denoiser config's runtime field `remat` names a policy; each family wraps its repeated blocks (DiT's
transformer blocks, the U-Nets' down, mid and up blocks) with `remat_call`, so the parameter tree, the
converted checkpoints and config.json are the same for every policy. The policies (jax.checkpoint's):

  none           keep every activation (fastest, most memory)
  full           keep only each block's inputs; the backward pass recomputes the whole block
  dots           keep the outputs of every matmul (jax.checkpoint_policies.checkpoint_dots), recompute the
                 cheap elementwise work (norms, activations, softmax) in between
  dots_no_batch  keep the outputs of matmuls without batch dimensions (weight projections:
                 dots_with_no_batch_dims_saveable); attention's batched q.k and p.v are recomputed
  offload        as dots_no_batch, but the kept outputs move to host memory ("pinned_host") until the
                 backward pass needs them (offload_dot_with_no_batch_dims): device memory of `full`,
                 recompute of `dots_no_batch`, paid in host transfers

Only the memory / compute trade changes, never the math: gradients agree to fp32 rounding.

On XLA:CPU the backward pass's recomputation is tied to the block's output cotangent (`_tied_to_cotangent`):
its default scheduler otherwise starts each block's recomputation as soon as the block's saved inputs exist,
in the forward pass, and keeps every block's activations until the backward pass reaches them, which is
what remat was meant to avoid.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.layers import materialize, one_after

# name -> jax.checkpoint policy (None: nothing saveable). "none" means no remat at all.
POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}
NAMES = ("none", *POLICIES)


def check_policy(value: Any) -> str:
    """The policy name of a config's `remat` value; True (the old switch) reads as 'full', False as 'none'.
    ValueError naming the key otherwise."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in NAMES:
        raise ValueError(f"remat={value!r} is not a rematerialisation policy (expected one of {', '.join(NAMES)})")
    return value


def _call(module: nn.Module, train: bool, *args: Any) -> Any:
    return module(*args, train=train)


def _tied_to_cotangent(remat_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`remat_fn(module, train, *args)` (an `nn.remat`-wrapped call) whose backward pass cannot start the
    recomputation before the cotangent of its output exists.

    The forward pass keeps what the remat keeps (the vjp's residuals: the block's parameters, inputs and
    rng keys, plus the policy's saved values). The backward pass scales every residual but the parameters
    by `one_after(cotangent)`, so each is a value XLA computes after the cotangent (a multiply by exactly
    one, fused into its first consumer). XLA:CPU drops `optimization_barrier` before scheduling, so a
    barrier would not do. Values and gradients are those of `remat_fn`.
    """
    tied: list[bool] = []  # per residual leaf: scaled in the backward pass (not a parameter); set in forward

    def forward(module: nn.Module, train: bool, *args: Any) -> tuple[Any, Any]:
        out, vjp_fn = nn.vjp(lambda m, *a: remat_fn(m, train, *a), module, *args)
        params = {id(leaf) for leaf in jax.tree.leaves(module.variables)}
        tied[:] = [id(leaf) not in params and jnp.issubdtype(leaf.dtype, jnp.inexact)
                   for leaf in jax.tree.leaves(vjp_fn)]
        return out, vjp_fn

    def backward(train: bool, vjp_fn: Any, cotangent: Any) -> Any:
        one = one_after(jax.tree.leaves(cotangent)[0], jnp.float32)
        leaves, treedef = jax.tree.flatten(vjp_fn)
        leaves = [leaf * one.astype(leaf.dtype) if tie else leaf for leaf, tie in zip(leaves, tied)]
        return jax.tree.unflatten(treedef, leaves)(cotangent)

    return nn.custom_vjp(remat_fn, forward_fn=forward, backward_fn=backward, nondiff_argnums=(1,))


def remat_call(module: nn.Module, policy: str, *args: Any, train: bool = False) -> Any:
    """`module(*args, train=train)`, its activations rematerialised in the backward pass under `policy`.

    `train` is static (it switches dropout on, a Python-level choice); `args` are arrays or pytrees of them.
    The module keeps its name and parameters, so the parameter tree does not depend on the policy. The
    outputs go through `layers.materialize`, so XLA:CPU computes each block's output once.
    """
    if policy == "none":
        out = module(*args, train=train)
    else:  # static_argnums counts the module as argument 0.
        call = nn.remat(_call, policy=POLICIES[policy], static_argnums=(1,))
        if jax.default_backend() == "cpu":
            call = _tied_to_cotangent(call)
        out = call(module, train, *args)
    return jax.tree.map(materialize, out)  # blocks' outputs are where residual streams leave them
