"""The train state (params, EMA params, optimizer state, step, skipped updates) and the optimizer built from
a config."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffax import parallel
from diffax.models import boxed_init


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # [] int32, batches trained on so far (micro-batches under accumulation)
    params: Any            # the trained weights (master copy, in the config's param_dtype)
    ema_params: Any        # exponential moving average of params: what sampling uses
    opt_state: optax.OptState
    skipped: jax.Array     # [] int32, steps whose update was skipped for a non-finite loss or gradient
    # The frozen base a fine-tuning run's params apply to (diffax.train.finetune): never trained or saved;
    # None for a plain run.
    frozen: Any = None


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate at each optimizer update: linear warm-up, then constant or cosine decay."""
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        # decay_steps counts the warm-up too; a run shorter than its warm-up simply ends warming up.
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, config.warmup_steps,
                                                      max(config.steps, config.warmup_steps + 1),
                                                      end_value=lr * 0.01)
    elif config.lr_schedule == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(config.warmup_steps, 1)), optax.constant_schedule(lr)],
            [config.warmup_steps])
    else:
        raise ValueError(f"train.lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")
    return schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the updates by min(1, max_norm / their global norm), as `torch.nn.utils.clip_grad_norm_` does.

    One scalar factor multiplies every leaf, an operation XLA fuses into each consumer of the clipped
    gradient (Adam's two moments). optax.clip_by_global_norm divides every element by the norm instead,
    which XLA computes once and keeps: a second copy of all gradients in the step's temporaries (3.2 GiB
    for SD 1.5's U-Net). Below the threshold the factor is exactly 1, so the gradient passes unchanged.
    """

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        scale = jnp.minimum(1.0, max_norm / optax.global_norm(updates))  # [] (a zero norm gives 1)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW on `make_schedule(config)`, global-norm clipping, optional accumulation over
    `grad_accum_steps` micro-batches (optax.MultiSteps)."""
    schedule = make_schedule(config)
    tx = optax.chain(
        clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                    weight_decay=config.weight_decay))
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx


def ema_decay(step: jax.Array, max_decay: float, warmup: bool) -> jax.Array:
    """EMA decay at `step`: diffusers' EMAModel warm-up min(max, (1 + step) / (10 + step)) when `warmup`,
    so early averages are not dominated by the random initialisation."""
    if not warmup:
        return jnp.asarray(max_decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """ema <- decay * ema + (1 - decay) * params, in the parameters' dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params)


def init_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Step 0: EMA starts as a copy of the initial params."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                      skipped=jnp.zeros((), jnp.int32))


def place_train_state(params: Any, tx: optax.GradientTransformation, shardings: Any) -> TrainState:
    """`init_train_state(params, tx)` made by one jitted program, laid out by `shardings` (a TrainState of
    shardings). Every buffer of the result is XLA's own: a donating train step cannot update in place an
    array that a CPU device took over from host memory (as `convert.load` returns them without `device=`),
    and would copy all the weights at its first call."""
    return jax.jit(lambda p: init_train_state(p, tx), out_shardings=shardings)(params)


def train_state_shardings(model: nn.Module, tx, mesh, rules: parallel.Rules = parallel.DEFAULT_RULES
                          ) -> tuple[TrainState, Any]:
    """(the TrainState as ShapeDtypeStructs, its NamedShardings on `mesh`) from the parameters' logical axes
    through `rules`, without computing anything: what placing or restoring a state on a mesh needs.

    The optimizer state inherits the parameters' partitioning boxes (optax maps over them), so one
    `nn.get_partition_spec` gives shardings for params, EMA and Adam moments alike.
    """
    abstract_boxed = jax.eval_shape(lambda k: init_train_state(boxed_init(model.config, k), tx), jax.random.key(0))
    abstract = nn.meta.unbox(abstract_boxed)
    return abstract, parallel.logical_shardings(nn.get_partition_spec(abstract_boxed), mesh, rules, shapes=abstract)
