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
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from diffax.models.layers import materialize

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


def remat_call(module: nn.Module, policy: str, *args: Any, train: bool = False) -> Any:
    """`module(*args, train=train)`, its activations rematerialised in the backward pass under `policy`.

    `train` is static (it switches dropout on, a Python-level choice); `args` are arrays or pytrees of them.
    The module keeps its name and parameters, so the parameter tree does not depend on the policy. The
    outputs go through `layers.materialize`, so XLA:CPU computes each block's output once.
    """
    if policy == "none":
        out = module(*args, train=train)
    else:  # static_argnums counts the module as argument 0.
        out = nn.remat(_call, policy=POLICIES[policy], static_argnums=(1,))(module, train, *args)
    return jax.tree.map(materialize, out)  # blocks' outputs are where residual streams leave them
