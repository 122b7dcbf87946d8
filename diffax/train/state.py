"""The train state (params, EMA params, optimizer state, step, skipped updates) and the optimizer built from
a config."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax


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


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW on `make_schedule(config)`, global-norm clipping, optional accumulation over
    `grad_accum_steps` micro-batches (optax.MultiSteps)."""
    schedule = make_schedule(config)
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
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
