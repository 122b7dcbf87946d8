"""The training loop: build everything from a config, resume if a checkpoint exists, step, log, save, sample.

    python train.py --config=configs/digits.py --workdir=runs/digits

The loop is thin on purpose: the step is `diffax.train.step.make_train_step`, jitted once with shardings
and a donated state; the loop only feeds batches, logs every `log_every` steps (the only host sync),
saves asynchronous Orbax checkpoints and writes sample grids. It stops when more than
`train.max_nonfinite_skips` updates were skipped for a non-finite loss or gradient, and saves and returns
at the step all processes agree on when the job is preempted (SIGTERM).
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from diffax import host_memory, parallel
from diffax.data import make_source, make_train_iterator, sdxl_cache
from diffax.models import boxed_init, build_model
from diffax.schedulers.names import scheduler_for
from diffax.train import autoencoder, checkpoint, evaluate, resume
from diffax.train import controlnet, finetune, text_encoder
from diffax.train.config import validate_config
from diffax.train.metrics import MetricsWriter, compiled_flops, step_scalars
from diffax.train.state import (TrainState, init_train_state, make_optimizer, make_schedule, place_train_state,
                                train_state_shardings)
from diffax.train.step import LossFn, Objective, make_health_check, make_train_step


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradient or the weights became NaN or inf; every checkpoint on disk is from before."""


def make_objective(config: ml_collections.ConfigDict, model: nn.Module, null_cond: Any = None) -> Objective:
    """The training objective from `config.diffusion` and facts about the model. `null_cond`: one example's
    unconditional inputs where the model's config cannot make them (a latent cache's empty-prompt embedding),
    which turns on label dropout for a text-conditioned model."""
    d = config.diffusion
    if isinstance(null_cond, dict) and "encoder_hidden_states" in null_cond and evaluate.takes_text(model.config):
        null_cond = sdxl_cache.unet_cond(null_cond, model.config, null=True)  # the cache's fields as keywords
    return Objective(
        alphas_cumprod=scheduler_for("ddpm", d).alphas_cumprod(),
        prediction_type=d.prediction_type,
        snr_gamma=d.snr_gamma if d.snr_gamma and d.snr_gamma > 0 else None,
        learn_sigma=model.config.learn_sigma,
        label_dropout=config.train.label_dropout if model.config.has_null_cond or null_cond is not None else 0.0,
        null_cond=null_cond,
        timestep_groups=finetune.timestep_groups(config),
        prior_loss_weight=config.train.prior_loss_weight)


def model_batch(batch: dict[str, np.ndarray], model: nn.Module) -> dict[str, Any]:
    """The data pipeline's {'image', 'label'} as the train step's {'image', 'cond'}: the labels become the
    model's `class_labels` for a class-conditional model and are ignored by an unconditional one; a
    text-conditioned model takes the batch's 'cond' (a latent cache's text embeddings) and its 'prior' row
    flags where a DreamBooth source gives them."""
    if autoencoder.is_autoencoder(model):  # an autoencoder reconstructs the images: nothing conditions it
        return {"image": batch["image"]}
    if text_encoder.is_composite(model) or evaluate.takes_text(model.config):
        if text_encoder.is_composite(model):  # the text encoder(s) run in the step, on token ids
            out = {"image": batch["image"], "cond": text_encoder.model_cond(batch)}
        else:
            out = {"image": batch["image"], "cond": sdxl_cache.unet_cond(batch["cond"], model.config)}
        if controlnet.is_controlnet(model):  # the ControlNet's conditioning images, [B, H, W, 3] in [0, 1]
            out["cond"]["controlnet_cond"] = batch["cond"]["controlnet_cond"]
        if "prior" in batch:  # DreamBooth: which rows are class images (diffax.data.dreambooth)
            out["prior"] = batch["prior"]
        return out
    cond = {"class_labels": batch["label"]} if model.config.num_classes else {}
    return {"image": batch["image"], "cond": cond}


def create_train_state(model: nn.Module, tx, mesh, key: jax.Array,
                       rules: parallel.Rules = parallel.DEFAULT_RULES) -> tuple[TrainState, Any]:
    """A fresh TrainState laid out on `mesh` by the parameters' logical axes (through `rules`), and its
    shardings (`train_state_shardings`)."""
    _, shardings = train_state_shardings(model, tx, mesh, rules)
    state = parallel.jit_with_rules(lambda k: nn.meta.unbox(init_train_state(boxed_init(model.config, k), tx)),
                                    mesh, rules, out_shardings=shardings)(key)
    return state, shardings


def jit_train_step(model: nn.Module, tx, objective: Objective, mesh, rules: parallel.Rules, shardings: Any,
                   train_config: ml_collections.ConfigDict, loss_fn: LossFn | None = None,
                   view: finetune.View | None = None):
    """The train step jitted for `mesh`: state laid out by `shardings` and donated, batch rows over the data
    axes, traced under `rules` so the models' activation constraints take effect."""
    step = make_train_step(model, tx, objective, ema_max_decay=train_config.ema_decay,
                           ema_warmup=train_config.ema_warmup, loss_fn=loss_fn, view=view)
    return parallel.jit_with_rules(
        step, mesh, rules, in_shardings=(shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)


def jit_health_check(model: nn.Module, objective: Objective, mesh, rules: parallel.Rules, shardings: Any,
                     loss_fn: LossFn | None = None, view: finetune.View | None = None):
    """`diffax.train.step.make_health_check` jitted for `mesh` like the train step (nothing donated: the
    state goes on to be saved and trained)."""
    return parallel.jit_with_rules(
        make_health_check(model, objective, loss_fn, view), mesh, rules,
        in_shardings=(shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
        out_shardings=parallel.replicated(mesh))


class PreemptionWatch:
    """Whether the job was told to stop (SIGTERM, the notice schedulers and TPU maintenance send), as a
    step number every process agrees on.

    Several processes: jax's preemption service (started by `jax.distributed.initialize`) catches the
    signal on any of them and `multihost_utils.reached_preemption_sync_point` turns it into the same step
    everywhere. One process: a SIGTERM handler sets a flag, installed while the watch is open (main thread
    only) and then put back.
    """

    def __init__(self):
        self.signalled = False
        self._previous = None

    def __enter__(self) -> "PreemptionWatch":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """Call after every step with its number: True at the step to save at before stopping."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled


def _stop_non_finite(manager, what: str) -> NonFiniteLossError:
    """The error that ends a diverged run, naming the last checkpoint on disk (all of them are good)."""
    checkpoint.wait_until_saved(manager)  # a failed save in flight is reported as such, in one line
    last = manager.latest_step()
    if last is None:
        return NonFiniteLossError(f"{what}. No checkpoint was saved: lower train.learning_rate or check the data.")
    return NonFiniteLossError(f"{what}. The last good checkpoint is step {last} in {manager.directory} (nothing "
                              f"later was saved): resume it with a lower train.learning_rate, or check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, step: int | None = None, *,
                       init_params: Any = None, loss_fn: LossFn | None = None) -> TrainState:
    """Train (or resume) the run in `workdir` up to `config.train.steps`; returns the final state.

    Resumes from the newest checkpoint that reads back intact, or from `step` (diffax.train.resume says
    which config changes a resumed run accepts).
    A new run starts from `init_params` (replicated on the mesh) instead of the model's random weights when
    given, and trains `loss_fn(params, batch, key)` instead of the config's diffusion loss: distillation
    (`diffax.train.distill`) starts a student from its teacher's weights, or trains LoRA factors alone
    (then `params` are not the model's weights, and train.sample_every must stay 0).
    """
    validate_config(config)
    host_memory.release_after_compiles()  # the compiler's freed memory, before the step allocates its own
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh, rules = parallel.mesh_from_config(config.mesh)
    tc = config.train
    if tc.batch_size % parallel.batch_divisor(mesh):
        raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of the number of batch shards "
                         f"({parallel.batch_divisor(mesh)} = mesh data x fsdp)")

    model = build_model(config.model)
    spec = model.config
    source = make_source(config.data)
    data_shape = tuple(np.shape(source[0]["image"]))
    if autoencoder.is_autoencoder(model):
        autoencoder.check_data(model, data_shape)
    elif spec.num_classes and source.num_classes > spec.num_classes:
        raise ValueError(f"data has {source.num_classes} classes but the model has {spec.num_classes} "
                         f"(model.num_class_embeds / model.num_classes)")
    elif data_shape != spec.sample_shape:
        raise ValueError(f"data images are {data_shape} but the model takes {spec.sample_shape} "
                         f"(data.image_size / data.channels vs the model block)")
    if not autoencoder.is_autoencoder(model) and evaluate.takes_text(spec) and "cond" not in source[0]:
        raise ValueError(f"model.name={config.model.name!r} is text-conditioned: train it from a latent cache "
                         f"written with a text encoder (data.source='latent_cache', docs/data.md)")
    it = make_train_iterator(source, global_batch_size=tc.batch_size, seed=config.seed,
                             worker_count=config.data.worker_count)

    tx = make_optimizer(tc)
    key = jax.random.key(config.seed)
    init_key, step_key, sample_key = jax.random.split(key, 3)
    tuning = finetune.prepare(config, model)  # train.init_from / train.finetune; None: a plain run
    if text_encoder.is_trained(config):  # the model becomes {'unet', 'text_encoder'}
        model, tuning = text_encoder.prepare(config, model, tuning, source)
    if isinstance(tuning, controlnet.ControlNetTuning):  # the model becomes {'controlnet', 'unet'}
        model = tuning.training_model(model, source)
    if tuning is not None:
        tuning.check_workdir(workdir)
        state, shardings = tuning.create_state(model, tx, mesh, rules)
    elif init_params is None:
        state, shardings = create_train_state(model, tx, mesh, init_key, rules)
    else:
        abstract = jax.eval_shape(lambda p: init_train_state(p, tx), init_params)
        shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
        state = place_train_state(init_params, tx, shardings)
    manager = checkpoint.make_manager(workdir, max_to_keep=tc.keep_checkpoints, keep_every=tc.keep_every)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    resume.check_cache(workdir, source, config, resuming=step is not None or manager.latest_step() is not None)
    restored = resume.resume(manager, abstract, it, config, workdir, step)
    if restored is None:
        resume.record_config(workdir, 0, config)
    else:
        state = restored if tuning is None else restored.replace(frozen=state.frozen)  # the base is not saved
        if jax.process_index() == 0:
            print(f"resumed from {manager.directory} at step {int(state.step)}", flush=True)

    if autoencoder.is_autoencoder(model):  # reconstruction + KL instead of a diffusion loss
        objective, loss_fn = None, loss_fn or autoencoder.make_loss_fn(model, config)
    else:
        objective = make_objective(config, model, text_encoder.null_cond(source) if text_encoder.is_trained(config)
                                   else getattr(source, "null_cond", None))
    view = None if tuning is None else tuning.view
    step_fn = jit_train_step(model, tx, objective, mesh, rules, shardings, tc, loss_fn, view)
    check_fn = jit_health_check(model, objective, mesh, rules, shardings, loss_fn, view)
    sampler = (text_encoder.Sampler if text_encoder.is_trained(config) else
               controlnet.Sampler if controlnet.is_controlnet(model) else evaluate.Sampler)(
        model, config, mesh, rules, source, param_view=None if view is None else lambda p, t: view(p[0], p[1], t))
    evaluate.check_eval(config, sampler)

    start = int(state.step)
    bar = tqdm(total=tc.steps, initial=start, disable=not sys.stderr.isatty() or jax.process_index() != 0,
               dynamic_ncols=True, desc="train")
    writer = MetricsWriter(workdir, resume_step=start)
    schedule = make_schedule(tc)
    step_flops = None
    t0, last_logged, skipped_seen = time.perf_counter(), start, int(state.skipped)
    with PreemptionWatch() as preemption:
        try:
            for step in range(start, tc.steps):
                batch = parallel.shard_batch(model_batch(next(it), model), mesh)
                if step == start:  # compile ahead (the call reuses it) so throughput excludes compilation
                    step_flops = compiled_flops(step_fn, state, batch, step_key)
                    t0 = time.perf_counter()
                state, metrics = step_fn(state, batch, step_key)
                done = step + 1
                preempted = preemption.reached(done)
                saving = done % tc.checkpoint_every == 0 or done == tc.steps or preempted
                if saving or done % tc.log_every == 0:
                    metrics = jax.device_get(metrics)  # the only host sync
                    skipped = int(metrics["skipped"])
                    if skipped > skipped_seen:
                        checkpoint.report(f"step {done}: {skipped - skipped_seen} update(s) since step {last_logged} "
                                          f"skipped for a non-finite loss or gradient ({skipped} in this run, "
                                          f"train.max_nonfinite_skips={tc.max_nonfinite_skips})")
                        skipped_seen = skipped
                    if skipped > tc.max_nonfinite_skips:
                        raise _stop_non_finite(
                            manager, f"{skipped} updates were skipped for a non-finite loss or gradient by step "
                                     f"{done}, more than train.max_nonfinite_skips={tc.max_nonfinite_skips} "
                                     f"(step {done}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']})")
                    scalars = step_scalars(metrics, steps=done - last_logged, seconds=time.perf_counter() - t0,
                                           batch_size=tc.batch_size, step_flops=step_flops,
                                           peak_flops=tc.peak_flops,
                                           learning_rate=schedule((done - 1) // tc.grad_accum_steps))
                    t0, last_logged = time.perf_counter(), done
                    rate, mfu = scalars["images_per_sec"], scalars.get("mfu")
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{rate:.0f}",
                                    **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
                    bar.update(done - bar.n)
                    if done % tc.log_every == 0 or done == tc.steps:
                        writer.write(done, scalars)
                    if bar.disable and jax.process_index() == 0:
                        print(f"step {done}/{tc.steps} loss {metrics['loss']:.4f} "
                              f"grad_norm {metrics['grad_norm']:.3f} lr {scalars['learning_rate']:.3g} "
                              f"img/s {rate:.0f}" + (f" mfu {mfu:.1%}" if mfu is not None else ""), flush=True)
                if saving:
                    # A saved state must be good itself: its own loss and gradient finite (the metrics above
                    # are of the weights before this step's update), every weight finite. Once per checkpoint.
                    health = jax.device_get(check_fn(state, batch, step_key))
                    what = (f"the weights after step {done} give loss {health['loss']}, gradient norm "
                            f"{health['grad_norm']}" + ("" if health["weights_finite"] else
                                                        " and are not all finite"))
                    if health["weights_finite"] and np.isfinite(health["loss"]) and np.isfinite(
                            health["grad_norm"]):
                        checkpoint.save(manager, state, config, it)
                    elif health["weights_finite"] and tc.max_nonfinite_skips and (done < tc.steps or preempted):
                        # The next step's update will be skipped (and counted) if this persists.
                        checkpoint.report(f"not saving step {done}: {what}; the last checkpoint stays")
                    else:
                        raise _stop_non_finite(manager, what)
                if preempted:
                    checkpoint.wait_until_saved(manager)
                    checkpoint.report(f"preempted: stopped after step {done}, the latest checkpoint is step "
                                      f"{manager.latest_step()}; run the same command to resume")
                    break
                sample_params = state.ema_params if view is None else (state.frozen, state.ema_params)
                if tc.sample_every and (done % tc.sample_every == 0 or done == tc.steps):
                    evaluate.write_grid(sampler, sample_params, workdir / "samples" / f"step_{done:06d}.png",
                                        sample_key)
                if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
                    writer.write(done, evaluate.evaluate(sampler, sample_params, config,
                                                         jax.random.fold_in(sample_key, 1)), section="eval")
        finally:  # an error mid-run still completes the checkpoint being written
            bar.close()
            writer.close()
            checkpoint.finish(manager)
    if tuning is not None and int(state.step) >= tc.steps and jax.process_index() == 0:
        exported = tuning.export(workdir, state.ema_params, config, model)
        if exported is not None:
            print(f"exported the {tuning.mode} result to {exported}", flush=True)
    if autoencoder.is_autoencoder(model) and int(state.step) >= tc.steps and jax.process_index() == 0:
        stats = autoencoder.export(model, jax.device_get(state.ema_params), source,
                                   workdir / autoencoder.EXPORT_DIR, config.seed)
        print(f"exported the autoencoder to {workdir / autoencoder.EXPORT_DIR}: " +
              ", ".join(f"{k} {v:.4g}" for k, v in stats.items()), flush=True)
    return state
