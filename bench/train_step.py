"""diffax vs torch on one full train step: noise, forward, MSE loss, backward, AdamW, EMA.

    python -m bench.train_step                          # every full-size case (DiT-XL/2 and SD 1.5 under the lock)
    python -m bench.train_step --quick                  # small widths only (digits b16, 2-layer DiT, small SD U-Net)
    python -m bench.train_step --cases=digits,dit-s     # a subset (names below)
    flock /tmp/diffax-big.lock python -m bench.train_step --cases=dit-xl,sd15

diffax runs its own train step, built as `train.py` builds it: `make_optimizer` (AdamW, global-norm
clipping) and `make_objective` from a run config, `init_train_state`, and `jit_train_step` (jitted with
the state donated). torch runs the step diffusers' training scripts run, eagerly: `add_noise`, the model,
`F.mse_loss`, `backward`, `clip_grad_norm_`, `torch.optim.AdamW`, `zero_grad`, and an EMA update with
`torch._foreach_lerp_` and diffusers' EMA warm-up. Both use the same config: constant learning rate 1e-4,
betas (0.9, 0.999), eps 1e-8, weight decay 1e-2, clipping at global norm 1 (not for the DiTs: `run_config`),
EMA decay 0.9999 with warm-up, plain epsilon MSE (no min-SNR weighting), no label dropout.

The torch model is built with random weights, saved with `save_pretrained` and loaded by
`diffax.convert.load`. Before timing, one step is taken from identical states with identical timesteps
and noise (drawn from the key diffax's step uses): the loss, the Adam first moment (the clipped gradient),
the weight change and the EMA change must agree. Cases that fit twice in memory are timed interleaved;
DiT-XL/2 and SD 1.5 (params + grads + two moments + EMA ~ 5x the weights per library) are timed in two
phases, diffax first, each library's peak resident memory read from VmHWM, and marked interleaved=False;
the diffax program is compiled from the state's shapes first and refused (MemoryError) when XLA's buffers
would not fit in the memory available. images/s = batch / median step time.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench import common  # importing the bench package first sets OMP_WAIT_POLICY for torch
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffax import convert, parallel
from diffax.models import build_model
from diffax.models.registry import make_module
from diffax.convert.registry import converter_for
from diffax.convert.rules import flatten, tensor_to_torch
from diffax.models.dit import DiTConfig
from diffax.models.unet2d import UNet2DConfig
from diffax.train.config import base_config
from diffax.train.loop import jit_train_step, make_objective
from diffax.train.state import init_train_state, make_optimizer, train_state_shardings

from bench import models
from bench.unet_sampling import load_recipe, torch_unet

# The optimizer both libraries run (diffusers' train_text_to_image defaults, learning rate 1e-4).
TRAIN = dict(learning_rate=1e-4, lr_schedule="constant", warmup_steps=0, adam_b1=0.9, adam_b2=0.999,
             adam_eps=1e-8, weight_decay=1e-2, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True, label_dropout=0.0)


@dataclasses.dataclass(frozen=True)
class Case:
    """One model, batch and conditioning to train."""
    name: str
    config: Any               # what the torch model is built from: a diffax config, or config.json keys (SD)
    batch: int
    cond: str                 # 'class_labels' | 'encoder_hidden_states'
    num_labels: int = 0       # class_labels drawn from [0, num_labels)
    context: tuple[int, int] = (77, 768)  # encoder_hidden_states [tokens, dim]
    split: bool = False       # too big for both at once: one library at a time (common.one_library_at_a_time)
    remat: bool = False       # rematerialise each block in the backward pass (both libraries)
    check_keys: str = ""      # regex of the torch parameters compared after one step ('' : all)
    opt_in: bool = False      # run only when named in --cases


def _dit(preset: str, **overrides: Any) -> DiTConfig:
    # diffusers' conventions (frequency shift 1, pre-MLP eps 1e-5) and no learned sigma: an epsilon-MSE model.
    return DiTConfig.preset(preset, **{"sample_size": 32, "out_channels": 4, "freq_shift": 1.0, "norm_eps": 1e-5,
                                       **overrides})


# A few layers from each end of the big models: comparing every layer would hold another copy of the weights.
_BIG_KEYS = r"^(conv_in|conv_out|pos_embed|proj_out|time_embedding)\.|(blocks\.0\.|mid_block\.).*(conv1|to_q|ff\.net\.2)"


def cases(quick: bool) -> list[Case]:
    """The cases `--quick` (small widths, CPU-friendly) or a full run measures."""
    digits = load_recipe()
    digits_config = build_model(digits.model).config
    if quick:
        return [
            Case("digits", digits_config, 16, "class_labels", num_labels=10),
            Case("dit-tiny", _dit("DiT-S/2", num_layers=2, num_attention_heads=2, num_embeds_ada_norm=10), 2,
                 "class_labels", num_labels=10),
            # Opt-in: its train step takes about 40 s to compile on 2 cores, longer than the rest of --quick.
            Case("sd15-small", models.SMALL_SD15_UNET, 1, "encoder_hidden_states", context=(77, 64), remat=True,
                 opt_in=True),
        ]
    return [
        Case("digits", digits_config, digits.train.batch_size, "class_labels", num_labels=10),
        Case("dit-s", _dit("DiT-S/2"), 2, "class_labels", num_labels=1000),
        Case("dit-xl", _dit("DiT-XL/2"), 2, "class_labels", num_labels=1000, split=True, check_keys=_BIG_KEYS),
        Case("sd15", models.SD15_UNET, 1, "encoder_hidden_states", split=True, remat=True, check_keys=_BIG_KEYS),
    ]


def run_config(case: Case) -> ml_collections.ConfigDict:
    """The run config both libraries train by: `TRAIN`, the case's batch, and the noise schedule its model
    trains with (the digits recipe's cosine, SD's scaled-linear, DiT's linear), plain MSE."""
    c = base_config()
    c.train.update(TRAIN)
    c.train.batch_size = case.batch
    if isinstance(case.config, UNet2DConfig):
        c.diffusion = load_recipe().diffusion
    elif isinstance(case.config, dict):  # SD 1.5's U-Net
        c.diffusion.update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    c.diffusion.snr_gamma = 0.0
    if isinstance(case.config, DiTConfig):
        # diffusers' DiT keeps a copy of the timestep / label embedder in every block (diffax: one, tied), so
        # the two gradients' global norms differ, and so would their clipped updates.
        c.train.grad_clip = 0.0
    return c


def rematerialised(case: Case, module: Any) -> Any:
    """`module` with diffax's 'full' policy where the case rematerialises (diffusers' gradient checkpointing
    recomputes each block in the backward pass) and the model has the field."""
    if case.remat and "remat" in type(module.config).runtime_fields:
        return make_module(dataclasses.replace(module.config, remat="full"))
    return module


def torch_model(config: Any) -> Any:
    """diffusers' model for `config` with random weights (bench.models' builders; the digits U-Net's from
    bench.unet_sampling)."""
    if isinstance(config, UNet2DConfig):
        return torch_unet(config)
    if isinstance(config, DiTConfig):
        return models.torch_dit(config)
    return models.torch_unet(config)


def make_batch(case: Case, config: Any, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(x0 [B, H, W, C], cond) as numpy: standard-normal latents or images, random labels or text states."""
    h, w, c = config.sample_shape
    x0 = rng.standard_normal((case.batch, h, w, c)).astype(np.float32)
    if case.cond == "class_labels":
        return x0, {"class_labels": rng.integers(0, case.num_labels, case.batch).astype(np.int32)}
    return x0, {"encoder_hidden_states": rng.standard_normal((case.batch, *case.context)).astype(np.float32)}


def step_draws(key: jax.Array, step: int, batch: int, shape: tuple[int, ...], num_t: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [B], noise) that diffax's train step draws at `step` from its base `key`
    (`diffax.train.step.diffusion_loss`'s key split), for the torch side of the agreement check."""
    k_t, k_noise, _, _ = jax.random.split(jax.random.fold_in(key, step), 4)
    return (np.asarray(jax.random.randint(k_t, (batch,), 0, num_t)),
            np.asarray(jax.random.normal(k_noise, shape, jnp.float32)))


# ----------------------------------------------------------------------------- the two train steps


class DiffaxTrainer:
    """diffax's train step as the train loop builds and jits it, with its state carried between calls."""

    def __init__(self, module: Any, params: Any, config: ml_collections.ConfigDict, x0: np.ndarray,
                 cond: dict[str, np.ndarray]):
        mesh, rules = parallel.mesh_from_config(config.mesh)
        tx = make_optimizer(config.train)
        objective = make_objective(config, module)
        abstract, shardings = train_state_shardings(module, tx, mesh, rules)
        self.batch = parallel.shard_batch({"image": x0, "cond": cond}, mesh)
        self.key = jax.random.key(0)
        self.num_t = objective.alphas_cumprod.shape[0]
        step = jit_train_step(module, tx, objective, mesh, rules, shardings, config.train)
        # Compiled from the state's shapes, so that a program too big for this machine is refused before the
        # state (4x the weights) is allocated.
        shapes = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings)
        self.program = common.compile_jitted(step, shapes, self.batch, self.key)
        models.free()  # the compiler's freed working memory (2.7 GiB at SD 1.5), before the state is made
        held = sum(np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))
        need, free = (self.program.peak_bytes or 0) - held, common.available_bytes()
        if free is not None and need > free:
            raise MemoryError(f"{module.config.class_name} train step: XLA's buffers need {need / 2**30:.1f} GiB beyond "
                              f"the loaded weights, {free / 2**30:.1f} GiB is available; not run")
        # The loaded weights may be host memory the CPU device took over without a copy (`convert.load`),
        # which XLA cannot update in place: the first donated step would copy all of them (3.3 GiB for
        # SD 1.5). Each weight is copied into a buffer of XLA's own first, one at a time, in the caller's dict.
        self.state = jax.device_put(init_train_state(models.to_device(params, copy=True), tx), shardings)
        self.converter = converter_for(module.config.class_name)

    def step(self) -> dict[str, Any]:
        """One train step; blocks until the new state exists. Returns the step's metrics."""
        self.state, metrics = self.program.compiled(self.state, self.batch, self.key)
        jax.block_until_ready((self.state, metrics))
        return metrics

    def leaves(self, tree: Any, keys: set[str] | None) -> dict[str, np.ndarray]:
        """{torch key: numpy copy} of the leaves of a params-shaped tree (all, or those named in `keys`)."""
        out = {}
        for path, value in flatten(tree).items():
            name, _ = tensor_to_torch(path, np.empty((0,) * np.ndim(value)), literal_names=self.converter.literal_names)
            if keys is None or name in keys:
                out[name] = np.array(tensor_to_torch(path, value, literal_names=self.converter.literal_names)[1])
        return out

    def snapshot(self, keys: set[str] | None) -> dict[str, dict[str, np.ndarray]]:
        """Params, EMA and Adam's first moment of the current state, as {what: {torch key: array}}."""
        adam = next(s for s in jax.tree.leaves(self.state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                    if isinstance(s, optax.ScaleByAdamState))
        return {"params": self.leaves(self.state.params, keys), "ema": self.leaves(self.state.ema_params, keys),
                "mu": self.leaves(adam.mu, keys)}


class TorchTrainer:
    """The train step of diffusers' training scripts (train_text_to_image.py), eager."""

    def __init__(self, model: Any, config: ml_collections.ConfigDict, alphas_cumprod: np.ndarray, x0: np.ndarray,
                 cond: dict[str, np.ndarray], device: Any, remat: bool):
        import torch

        tc = config.train
        self.model = model.to(device).train()
        # diffusers' DiT drops labels inside the model in train mode (LabelEmbedding.dropout_prob); diffax's
        # step does it itself (train.label_dropout). Both are off here, so both see the same labels.
        for m in self.model.modules():
            if type(m).__name__ == "LabelEmbedding":
                m.dropout_prob = 0.0
        if remat:
            self.model.enable_gradient_checkpointing()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.learning_rate, betas=(tc.adam_b1, tc.adam_b2),
                                           eps=tc.adam_eps, weight_decay=tc.weight_decay)
        self.ema = [p.detach().clone() for p in self.params]
        self.ema_max_decay, self.grad_clip = tc.ema_decay, tc.grad_clip
        self.updates = 0
        self.abar = torch.from_numpy(alphas_cumprod.astype(np.float32)).to(device)
        self.x0 = torch.from_numpy(np.ascontiguousarray(x0.transpose(0, 3, 1, 2))).to(device)  # [B, C, H, W]
        self.cond = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "i" else v).to(device)
                     for k, v in cond.items()}
        self.device = device

    def step(self, t: np.ndarray | None = None, noise: np.ndarray | None = None) -> float:
        """One train step (fresh timesteps and noise unless given, noise NHWC); returns the loss."""
        import torch
        import torch.nn.functional as F

        x0 = self.x0
        if noise is None:
            noise_t = torch.randn_like(x0)
            t_t = torch.randint(0, self.abar.shape[0], (x0.shape[0],), device=self.device)
        else:
            noise_t = torch.from_numpy(np.array(noise.transpose(0, 3, 1, 2))).to(self.device)
            t_t = torch.from_numpy(t.astype(np.int64)).to(self.device)
        abar = self.abar[t_t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise_t  # DDPMScheduler.add_noise
        pred = self.model(x_t, t_t, **self.cond).sample
        loss = F.mse_loss(pred.float(), noise_t.float(), reduction="mean")
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # diffusers' EMAModel.get_decay with use_ema_warmup=False's (1 + n) / (10 + n) form, as diffax's
        # ema_warmup; lerp(ema, p, 1 - decay) = decay * ema + (1 - decay) * p.
        decay = min(self.ema_max_decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)
        self.updates += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return float(loss.detach())

    def snapshot(self, keys: set[str] | None) -> dict[str, dict[str, np.ndarray]]:
        """Params, EMA and AdamW's exp_avg as {what: {torch key: array}} (exp_avg only where a step set one)."""
        out: dict[str, dict[str, np.ndarray]] = {"params": {}, "ema": {}, "mu": {}}
        for (name, p), e in zip(((n, p) for n, p in self.model.named_parameters() if p.requires_grad), self.ema):
            if keys is not None and name not in keys:
                continue
            out["params"][name] = p.detach().cpu().numpy().copy()
            out["ema"][name] = e.cpu().numpy().copy()
            state = self.optimizer.state.get(p, {})
            if "exp_avg" in state:
                out["mu"][name] = state["exp_avg"].cpu().numpy().copy()
        return out


# ----------------------------------------------------------------------------- agreement


# Parameters left out of the layer-by-layer comparison:
#   attention key biases: adding b to every key adds q.b to a whole row of logits, which softmax cancels, so
#   their gradient is zero in exact arithmetic and both libraries return rounding noise (relative error O(1));
#   DiT's per-block embedders: diffusers keeps a copy of the timestep/label embedder in every block and runs
#   each (diffax: one, tied), so each copy gets its own share of the gradient.
_NOT_COMPARED = re.compile(r"\.to_k\.bias$|transformer_blocks\.\d+\.norm1\.emb\.")


def compared_keys(model: Any, pattern: str) -> set[str] | None:
    """Torch parameter names the agreement check compares: those matching `pattern`, or all ('')."""
    names = [n for n, _ in model.named_parameters() if not _NOT_COMPARED.search(n)]
    return set(n for n in names if not pattern or re.search(pattern, n))


def agreement(before: dict, d_after: dict, t_after: dict, d_loss: float, t_loss: float, mu_floor: float
              ) -> dict[str, float]:
    """Max relative errors after one step from identical states: the loss, Adam's first moment ((1 - b1) x the
    gradient), the change of the weights and the change of the EMA, each the worst over the layers.

    Adam's first update is lr x g / (|g| + eps) plus the decay: where |g| is near eps it swings between
    -lr and lr with the gradient's rounding, so the changes are compared where torch's first moment
    exceeds `mu_floor` and 1% of its layer's largest, that is where the update is set by the gradient
    rather than by its rounding. The gradients themselves are compared in every layer whose first moment
    reaches `mu_floor` somewhere: below it a layer's gradient is rounding noise (a small U-Net's outer layers
    get gradients of 1e-9 at initialisation, whose relative error between the libraries is of order 1).
    A change of ~lr is known only to the rounding of the stored fp32 weight (1e-7 x |w|, ~1e-3 of the
    change), so each element's difference is counted beyond two units in the last place of its weight.
    """
    def worst(what: str) -> float:
        errs = []
        for name, want in t_after[what].items():
            got = d_after[what][name]
            if what == "mu":
                if np.abs(want).max() > mu_floor:
                    errs.append(common.rel_err(got, want))
                continue
            mu = np.abs(t_after["mu"][name])
            keep = mu > max(mu_floor, 1e-2 * mu.max())
            if not keep.any():
                continue
            excess = np.maximum(np.abs(got - want) - 2 * np.spacing(np.abs(want)), 0)[keep]
            errs.append(float(excess.max() / np.abs(want - before[name])[keep].max()))
        if not errs:
            raise RuntimeError(f"agreement check: no layer compared for {what}")
        return max(errs)

    return {"loss": common.rel_err(np.float64(d_loss), np.float64(t_loss)), "grad": worst("mu"),
            "update": worst("params"), "ema": worst("ema")}


# ----------------------------------------------------------------------------- running a case


def _gib(n: int | None) -> float | None:
    return None if n is None else n / 2.0 ** 30


def run_case(case: Case, args: argparse.Namespace, device: Any, peak: dict[str, Any], folder: Path
             ) -> dict[str, Any]:
    """Builds both sides of one case, checks them against each other, times them; returns the table row."""
    case_start = time.perf_counter()
    watch = common.Stopwatch(case.name)
    split = case.split and common.one_library_at_a_time(device)
    config = run_config(case)
    model = torch_model(case.config)
    model.save_pretrained(folder, max_shard_size=models.MAX_SHARD_SIZE)
    watch.lap("torch model built and saved")
    torch_class = type(model)
    keys = compared_keys(model, case.check_keys)
    module, params = convert.load(folder)
    module = rematerialised(case, module)
    remat = module.config.remat if "remat" in type(module.config).runtime_fields else "none"
    params = models.to_device(params)
    watch.lap("converted and placed (convert.load)")
    n_params = int(sum(np.size(a) for a in jax.tree.leaves(params)))
    x0, cond = make_batch(case, module.config, np.random.default_rng(0))
    if split:
        del model
        models.free()
    rss = {}

    # diffax: compile, one step from the shared initial state (kept for the check), then timing if interleaved.
    common.reset_peak_rss()
    d = DiffaxTrainer(module, params, config, x0, cond)
    watch.lap("diffax step compiled, state made")
    del params
    before = d.leaves(d.state.params, keys)
    t, noise = step_draws(d.key, 0, case.batch, x0.shape, d.num_t)
    start = time.perf_counter()
    d_loss = float(d.step()["loss"])
    d_first = time.perf_counter() - start
    d_after = d.snapshot(keys)
    watch.lap("diffax first step")
    program = d.program
    timings: dict[str, common.Timing] = {}
    if split:
        timings["diffax"] = common.time_interleaved({"diffax": d.step}, repeats=case_repeats(case, args),
                                                    warmup=0)["diffax"]
        rss["diffax"] = common.peak_rss_bytes()
        program = dataclasses.replace(program, compiled=None)
        del d
        models.free()
        common.reset_peak_rss()
        model = torch_class.from_pretrained(folder)

    tr = TorchTrainer(model, config, make_objective(config, module).alphas_cumprod, x0, cond, device, case.remat)
    start = time.perf_counter()
    t_loss = tr.step(t, noise)
    t_first = time.perf_counter() - start
    mu_floor = (1 - config.train.adam_b1) * 100 * config.train.adam_eps  # gradients 100x Adam's eps
    errs = agreement(before, d_after, tr.snapshot(keys), d_loss, t_loss, mu_floor)
    err = max(errs.values())
    watch.lap("torch first step and the check")
    print(f"{case.name}: loss diffax {d_loss:.6f} torch {t_loss:.6f}; max relative errors "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    # One fp32 step: the forward's 1e-4 bound (the update is AdamW's, ~lr x sign(grad), so its relative
    # error is the gradient's where the gradient is well above eps).
    common.check_agreement(f"{case.name} train step", err, common.agreement_tolerance(device))
    if split:
        timings["torch"] = common.time_interleaved({"torch": tr.step}, repeats=case_repeats(case, args),
                                                   warmup=0)["torch"]
        rss["torch"] = common.peak_rss_bytes()
    else:
        timings.update(common.time_interleaved({"diffax": d.step, "torch": tr.step}, repeats=args.repeats))
    del tr, model
    models.free()

    side = module.config.sample_shape[0]
    row = common.case_row(
        f"{case.name} {side}x{side} train step b{case.batch}", diffax=timings["diffax"], torch=timings["torch"],
        program=program, flops=program.flops, peak=peak, max_rel_err=err, first_call_s=(d_first, t_first),
        group="train", interleaved=not split, batch=case.batch,
        diffax_images_s=case.batch / timings["diffax"].median, torch_images_s=case.batch / timings["torch"].median,
        diffax_remat=remat, torch_remat=case.remat, loss_diffax=d_loss, loss_torch=t_loss,
        **{f"err_{k}": v for k, v in errs.items()},
        parameters=n_params,
        diffax_peak_rss_gib=_gib(rss.get("diffax")), torch_peak_rss_gib=_gib(rss.get("torch")),
        case_seconds=time.perf_counter() - case_start)
    return row


def case_repeats(case: Case, args: argparse.Namespace) -> int:
    """Timed steps per library: `--repeats`, or `--sd_repeats` for the SD 1.5 case (a minute a step on 2 cores)."""
    return args.sd_repeats if case.name == "sd15" else args.repeats


COLUMNS = (
    ("case", "case", "{}"),
    ("diffax img/s", "diffax_images_s", "{:.2f}"),
    ("torch img/s", "torch_images_s", "{:.2f}"),
    ("diffax ms", "diffax_ms", "{:.0f}"),
    ("torch ms", "torch_ms", "{:.0f}"),
    ("spread d/t", "spread", "{}"),
    ("system s d/t", "system_s", "{}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("interleaved", "interleaved", "{}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("GFLOP", "gflop", "{:.0f}"),
    ("diffax % peak", "diffax_pct_peak", "{:.0f}%"),
    ("torch % peak", "torch_pct_peak", "{:.0f}%"),
    ("diffax MiB", "diffax_peak_mib", "{:.0f}"),
    ("diffax RSS GiB", "diffax_peak_rss_gib", "{:.1f}"),
    ("torch RSS GiB", "torch_peak_rss_gib", "{:.1f}"),
    ("max rel err", "max_rel_err", "{:.1e}"),
    ("case s", "case_seconds", "{:.0f}"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `parse_args(["--quick"])` is what `make bench --quick` uses."""
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small widths only (digits b16, tiny DiT, tiny SD U-Net)")
    parser.add_argument("--cases", default="", help="comma-separated case names: quick digits, dit-tiny, sd15-small "
                        "(opt-in); full digits, dit-s, dit-xl, sd15 (default: the mode's cases but opt-in ones)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per library (median)")
    parser.add_argument("--sd_repeats", type=int, default=2, help="timed steps per library for SD 1.5")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the machine's cores")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs the cases, writes bench/results/train_step[_quick][_<case>...].json and returns the rows."""
    device = common.setup_torch(args.torch_threads)
    peak = peak or common.matmul_peak(device)
    names = args.cases.split(",") if args.cases else []
    chosen = [c for c in cases(args.quick) if c.name in names or (not names and not c.opt_in)]
    if not chosen:
        raise ValueError(f"--cases={args.cases!r} names no case of this mode: {[c.name for c in cases(args.quick)]}")
    rows = []
    for case in chosen:
        with tempfile.TemporaryDirectory() as folder:
            try:
                rows.append(run_case(case, args, device, peak, Path(folder)))
            except MemoryError as e:  # refused before allocating: the other cases still run
                print(f"{case.name}: {e}", flush=True)
                rows.append({"case": f"{case.name}: not run (does not fit in memory)", "note": str(e), "group": "train"})
        common.print_table(rows[-1:], COLUMNS)
    name = "train_step" + ("_quick" if args.quick else "") + "".join(f"_{c}" for c in args.cases.split(",") if c)
    common.write_json(name.replace("-", "_"), {
        "benchmark": "train_step", "args": vars(args), "train": TRAIN,
        "machine": common.machine_info(), "matmul_peak": peak, "rows": rows})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run from the command line and print the table."""
    common.print_table(run(parse_args(argv)), COLUMNS)


if __name__ == "__main__":
    main()
