"""The pure train step: noise a batch, run the model, take one optimizer step, update the EMA.

It is generic over the model (any Flax module called as `module.apply({"params": p}, x_t, t, **cond,
train=True, rngs=...)`, with `module.config.null_cond` for label dropout), the objective (prediction type,
loss weighting, learned-variance hybrid loss) and the trainable-parameter mask: `tx` decides what moves, so
full, LoRA and scale-only training are the same step with another mask (e.g. `optax.multi_transform` with
`optax.set_to_zero()` on the frozen leaves).
A fine-tuning run (diffax.train.finetune) trains a small tree (LoRA factors, quantization scales) and passes
`view(state.frozen, trainable, t) -> params`, which builds the weights the model runs on.
`make_train_step` closes over those choices and returns a function of (state, batch, key) that the loop
jits with shardings and a donated state. A batch is `{"image": [B, H, W, C], "cond": {...}}`, `cond` holding
the model's keyword inputs (`{"class_labels": [B]}`, `{}` for an unconditional model).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffax import learned_variance, objectives
from diffax.quant import tuneqdm
from diffax.train.state import TrainState, ema_decay, update_ema


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the model learns: the noise schedule, what it predicts, and how the loss is weighted."""
    alphas_cumprod: np.ndarray          # [T] float64 training schedule
    prediction_type: str = "epsilon"    # epsilon | v_prediction | sample
    snr_gamma: float | None = None      # min-SNR-gamma weighting (Hang et al. 2023); None: plain MSE
    learn_sigma: bool = False           # model outputs 2C channels: [prediction, variance interpolation]
    label_dropout: float = 0.0          # probability of replacing an example's cond by the model's null_cond
    timestep_groups: int = 1            # > 1: a batch's timesteps all lie in one of this many equal ranges (TuneQDM)
    # One example's 'no conditioning' inputs (no batch axis) where the model's config cannot make them: the
    # empty prompt's text embedding {'encoder_hidden_states': [L, D]} of a text-conditioned U-Net. A None
    # leaf is an input dropout leaves as it is (an SDXL U-Net's time_ids).
    null_cond: Any = None
    prior_loss_weight: float = 1.0      # DreamBooth batches (a 'prior' row flag): the class rows' loss weight

    def __post_init__(self):
        if self.learn_sigma and self.prediction_type != "epsilon":
            raise ValueError(f"a learn_sigma model trains with DiT's hybrid loss, which predicts epsilon; "
                             f"diffusion.prediction_type is {self.prediction_type!r}")

    def variance_tables(self) -> learned_variance.VarianceTables:
        """The learned-variance tables of this schedule (betas recovered from alpha_bar)."""
        abar = self.alphas_cumprod
        return learned_variance.variance_tables(1.0 - abar / np.append(1.0, abar[:-1]))

    def __hash__(self) -> int:  # the table is a constant of the compiled step
        null = tuple(np.asarray(x).tobytes() for x in jax.tree.leaves(self.null_cond))
        return hash((self.alphas_cumprod.tobytes(), self.prediction_type, self.snr_gamma, self.learn_sigma,
                     self.label_dropout, null, self.timestep_groups, self.prior_loss_weight))


def drop_cond(cond: Any, null: Any, key: jax.Array, rate: float) -> Any:
    """Each example's conditioning replaced by `null` (same structure) with probability `rate`, for
    classifier-free guidance training. One draw per example serves every leaf, so an example loses all of
    its conditioning at once (a text prompt's hidden states and pooled embedding together)."""
    leaves = jax.tree.leaves(cond)
    if rate <= 0.0 or not leaves:
        return cond
    drop = jax.random.uniform(key, (leaves[0].shape[0],)) < rate  # [B]

    def pick(c: jax.Array, n: jax.Array) -> jax.Array:
        return jnp.where(drop.reshape(drop.shape + (1,) * (c.ndim - 1)), n, c)  # mask over trailing axes

    return jax.tree.map(pick, cond, null)


def diffusion_loss(model: nn.Module, params: Any, objective: Objective, batch: dict[str, Any],
                   key: jax.Array, train: bool = True, view: Callable[[Any, jax.Array], Any] | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss over the batch and metrics. batch: {'image': [B, H, W, C], 'cond': the model's keyword
    inputs (optional: none), 'prior': [B] bool (optional: DreamBooth's class rows, `prior_preservation_loss`)}.
    `view(params, t)`, when given, makes the weights the model runs on from the
    trained tree `params` and the batch's timesteps t [B]."""
    x0 = batch["image"]
    k_t, k_noise, k_cond, k_dropout = jax.random.split(key, 4)
    num_t = objective.alphas_cumprod.shape[0]
    if objective.timestep_groups > 1:  # one group per batch: the view uses one scale set per model call
        _, t = tuneqdm.sample_group_timesteps(k_t, x0.shape[0], num_t, objective.timestep_groups)
    else:
        t = jax.random.randint(k_t, (x0.shape[0],), 0, num_t)  # [B]
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = objectives.q_sample(objective.alphas_cumprod, x0, noise, t)
    cond = batch.get("cond", {})
    if train and objective.label_dropout > 0 and jax.tree.leaves(cond):
        if objective.null_cond is None:
            null = model.config.null_cond(cond)
        else:
            # a None leaf keeps the example's own input (SDXL's time ids describe the image, not the prompt),
            # and so does a key the null conditioning lacks (a ControlNet's conditioning image: only the
            # prompt is dropped, as diffusers' proportion_empty_prompts drops it)
            null_cond = {k: objective.null_cond.get(k) for k in cond}
            null = jax.tree.map(lambda n, c: c if n is None else jnp.broadcast_to(n, c.shape).astype(c.dtype),
                                null_cond, cond, is_leaf=lambda n: n is None)
        cond = drop_cond(cond, null, k_cond, objective.label_dropout)
    if view is not None:
        params = view(params, t)
    out = model.apply({"params": params}, x_t, t, **cond, train=train, rngs={"dropout": k_dropout})
    if objective.learn_sigma:
        parts = learned_variance.hybrid_loss(objective.variance_tables(), out, x0, x_t, noise, t)
        if objective.snr_gamma is not None:  # min-SNR weights the eps term; the vb term keeps its own scale
            weight = objectives.loss_weight("epsilon", objective.alphas_cumprod, t, objective.snr_gamma)
            parts["loss"] = parts["mse"] * weight + parts["vb"]
        metrics = {k: v.mean() for k, v in parts.items()}
        return metrics["loss"], metrics
    if "prior" in batch:
        return prior_preservation_loss(out, x0, noise, t, objective, batch["prior"])
    loss = objectives.diffusion_loss(out, x0, noise, t, objective.alphas_cumprod, objective.prediction_type,
                                     snr_gamma=objective.snr_gamma)
    return loss, {"loss": loss}


def prior_preservation_loss(out: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array, objective: Objective,
                            prior: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DreamBooth's loss (diffusers' train_dreambooth.py) over instance rows (prior False) and class rows
    (prior True) [B]: the instance rows' mean error (min-SNR weighted with snr_gamma) plus
    `objective.prior_loss_weight` x the class rows' plain mean error. Each mean is over its own rows, so a
    batch of n instance and n class rows gives diffusers' value for its [instances, classes] halves."""
    per_example = objectives.per_example_error(out, x0, noise, t, objective.alphas_cumprod,
                                               objective.prediction_type)  # [B]
    is_class = prior.astype(jnp.float32)  # [B]
    is_instance = 1.0 - is_class
    weight = is_instance
    if objective.snr_gamma is not None:  # diffusers weights the instance term only
        weight = weight * objectives.loss_weight(objective.prediction_type, objective.alphas_cumprod, t,
                                                 objective.snr_gamma)
    instance = jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(is_instance), 1.0)
    prior_loss = jnp.sum(per_example * is_class) / jnp.maximum(jnp.sum(is_class), 1.0)
    loss = instance + objective.prior_loss_weight * prior_loss
    return loss, {"loss": loss, "instance_loss": instance, "prior_loss": prior_loss}


# loss_fn(params, batch, key) -> (mean loss, metrics {'loss': ..., ...}): what a train step differentiates.
LossFn = Callable[[Any, dict[str, Any], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def objective_loss(model: nn.Module, objective: Objective, view: Callable[[Any, jax.Array], Any] | None = None
                   ) -> LossFn:
    """`diffusion_loss` of `model` under `objective` (and `view`) as a LossFn: the train step's default."""
    return lambda params, batch, key: diffusion_loss(model, params, objective, batch, key, view=view)


# view(frozen, trained params, t [B]) -> the weights the model runs on (diffax.train.finetune).
View = Callable[[Any, Any, jax.Array], Any]


def _step_loss(model: nn.Module, objective: Objective, loss_fn: LossFn | None, view: View | None,
               state: TrainState) -> LossFn:
    """The LossFn of one step: `loss_fn`, or the diffusion loss with `view` bound to the state's frozen base."""
    if view is None:
        return loss_fn or objective_loss(model, objective)
    if loss_fn is not None:
        raise ValueError("a train step takes a loss_fn or a fine-tuning view, not both")
    return objective_loss(model, objective, functools.partial(view, state.frozen))


def all_finite(tree: Any) -> jax.Array:
    """[] bool: whether every element of every leaf of `tree` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _applied_update(opt_state: Any) -> jax.Array:
    """Whether the optimizer update just taken moved the parameters: always, except inside gradient
    accumulation (optax.MultiSteps), which moves them on the last micro-batch of each group only."""
    if isinstance(opt_state, optax.MultiStepsState):
        return opt_state.mini_step == 0
    return jnp.asarray(True)


def _updates_so_far(state: TrainState) -> jax.Array:
    """Parameter updates applied before this step: the EMA warm-up's clock."""
    if isinstance(state.opt_state, optax.MultiStepsState):
        return state.opt_state.gradient_step
    return state.step - state.skipped


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, objective: Objective, *,
                    ema_max_decay: float = 0.9999, ema_warmup: bool = True, loss_fn: LossFn | None = None,
                    view: View | None = None
                    ) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """(state, batch, key) -> (state, metrics); `key` is the run's base key, folded with the step so a
    resumed run draws exactly the noise an uninterrupted one would.

    A step whose loss, gradient or updated weights are not finite changes nothing but `step` and `skipped`: the parameters,
    EMA and optimizer state (moments, accumulated gradients, schedule count) stay as they were, so one bad
    batch cannot poison the run; the loop decides when too many skips end it. Under gradient accumulation
    (`tx` an optax.MultiSteps) the EMA moves only on the micro-batches where the parameters do.
    Metrics: the loss terms, `grad_norm`, `skipped` (the run's total so far).
    `loss_fn` replaces the diffusion loss of `model` and `objective` (distillation: `diffax.train.distill`).
    `view`: the params are a fine-tuning run's trainable tree, and the model runs on
    `view(state.frozen, params, t)` (LoRA factors merged, quantization scales applied).
    """

    def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)
        loss = _step_loss(model, objective, loss_fn, view, state)
        grad_fn = jax.value_and_grad(lambda p: loss(p, batch, step_key), has_aux=True)
        (loss, metrics), grads = grad_fn(state.params)
        grad_norm = optax.global_norm(grads)

        def updated(state: TrainState) -> TrainState:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = update_ema(state.ema_params, params,
                             ema_decay(_updates_so_far(state), ema_max_decay, ema_warmup))
            ema = jax.tree.map(lambda new, old: jnp.where(_applied_update(opt_state), new, old), ema,
                               state.ema_params)
            return state.replace(params=params, ema_params=ema, opt_state=opt_state)

        # A finite gradient can still overflow a weight (a learning rate far too high): checked too. The
        # check only reads the updated weights (XLA fuses it with the optimizer's arithmetic), and the
        # update is then written once, over the donated state, in the branch taken. Selecting between
        # whole new and old trees instead kept both alive: about twice the weights in temporaries.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(updated(state).params)
        state = jax.lax.cond(finite, updated, lambda state: state, state)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        metrics = {**metrics, "grad_norm": grad_norm, "skipped": skipped}
        return state.replace(step=state.step + 1, skipped=skipped), metrics

    return train_step


def make_health_check(model: nn.Module, objective: Objective, loss_fn: LossFn | None = None,
                      view: View | None = None
                      ) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], dict[str, jax.Array]]:
    """(state, batch, key) -> {'loss', 'grad_norm', 'weights_finite'} of `state`'s own parameters.

    The train step's metrics describe the parameters it started from; a state about to be saved has taken
    one more update, which may have diverged. This evaluates the loss and gradient of the state's own
    parameters with the key the next train step would use, and whether every parameter and EMA leaf is
    finite, so that the loop saves a state only when all three are finite. `loss_fn` and `view` as in
    `make_train_step`.
    """

    def health_check(state: TrainState, batch: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
        step_key = jax.random.fold_in(key, state.step)
        loss = _step_loss(model, objective, loss_fn, view, state)
        grad_fn = jax.value_and_grad(lambda p: loss(p, batch, step_key)[0])
        loss, grads = grad_fn(state.params)
        weights_finite = all_finite((state.params, state.ema_params))
        return {"loss": loss, "grad_norm": optax.global_norm(grads), "weights_finite": weights_finite}

    return health_check

