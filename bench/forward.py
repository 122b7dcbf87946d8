"""diffax vs diffusers/transformers on torch: one forward pass of each model a Stable Diffusion or DiT run calls.

    python -m bench.forward                          # every case at full size (under flock /tmp/diffax-big.lock)
    python -m bench.forward --quick                  # the same cases at small widths, seconds each
    python -m bench.forward --cases=sd15,vae --repeats=9
    flock /tmp/diffax-big.lock python -m bench.forward --cases=sdxl

Cases (`--cases`, comma-separated; default all), full size / `--quick`:
  dit         DiT-XL/2 (675 M) / DiT-S/2 on 32x32x4 latents, batch 2, 1000 classes.
  sd15        SD 1.5's UNet2DConditionModel (860 M) / the same layout at widths (32, 64, 128, 128), on
              64x64 / 32x32 latents with 77 text tokens, batch 1 and batch 2.
  sdxl        SDXL base's UNet (2.6 B) / small widths, on 128x128 / 32x32 latents with 77 tokens and the
              'text_time' embeddings, batch 1. Its fp32 weights are 10.3 GB per library, so on a CPU the
              libraries run in turn (`interleaved=False`): torch computes the reference output and is freed,
              diffax is loaded, checked against it and timed, freed, then torch is reloaded from the same
              folder and timed. A GPU holds both: there they are timed interleaved, with no reload.
  vae         SD's VAE decoder (AutoencoderKL.decode): 64x64x4 latents -> 512x512 images / 32 -> 256 at small
              widths, batch 1.
  clip        CLIP-L's text encoder (openai/clip-vit-large-patch14, 123 M) / small widths, 77 tokens, batch 1
              and 2.
  controlnet  SD 1.5 ControlNet (361 M) on a 512x512 / 256x256 conditioning image, its residuals fed into the
              SD 1.5 UNet: one call of both, batch 1.

Every torch model is built with random weights (bench/models.py), saved with `save_pretrained` and loaded in
diffax with `diffax.convert.load`; outputs are checked to agree (fp32, 1e-4 relative on a CPU) before
anything is timed. The first call of each library is the warm-up (reported as first-call time); then
`--repeats` timed calls, interleaved. diffax uses its default attention backend ('auto').
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import common  # importing the bench package first sets OMP_WAIT_POLICY for torch
from bench import models
from diffax import convert
from diffax.models.dit import DiT, DiTConfig

CASES = ("dit", "sd15", "sdxl", "vae", "clip", "controlnet")
TOKENS = 77


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `parse_args([])` is the full-size run, `parse_args(["--quick"])` the small one."""
    parser = argparse.ArgumentParser(prog="python -m bench.forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small widths (and latents) of every case")
    common.cases_flag(parser, tuple(CASES), default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per library and case (median)")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the machine's cores")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute of both libraries (bfloat16: what GPU and TPU runs use)")
    parser.add_argument("--torch_compile", action="store_true",
                        help="time torch.compile'd models (the compilation is the untimed first call)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- helpers


def _nchw(x: np.ndarray, device: Any, dtype: Any = None) -> Any:
    return _tensor(x.transpose(0, 3, 1, 2), device, dtype)


def _nhwc(x: Any) -> np.ndarray:
    return x.float().cpu().numpy().transpose(0, 2, 3, 1)


def _tensor(x: np.ndarray, device: Any, dtype: Any = None) -> Any:
    """x on `device`; a float array in `dtype` (the models' --dtype) when given, integers as they are."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _torch_dtype(args: argparse.Namespace) -> Any:
    import torch

    return getattr(torch, args.dtype)


def _twin(model: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any]:
    """(diffax module, its params on the device, the torch model) in --dtype, from the fp32 torch model:
    diffax reads the saved fp32 weights with `dtype=param_dtype=--dtype`, torch casts its own."""
    module, params = models.to_diffax(model, dtype=args.dtype, param_dtype=args.dtype)
    return module, models.to_device(params), model.to(_torch_dtype(args))


def _compiled(fn: Any, args: argparse.Namespace) -> Any:
    """`torch.compile(fn)` under --torch_compile, else fn."""
    import torch

    return torch.compile(fn) if args.torch_compile else fn


def _suffix(args: argparse.Namespace) -> str:
    """What a row's name adds for the non-default settings."""
    return ("" if args.dtype == "float32" else f" {args.dtype}") + (" torch.compile" if args.torch_compile else "")


def _tolerance(args: argparse.Namespace, device: Any) -> float:
    """The agreement bound: `common.agreement_tolerance`, or 0.1 in bfloat16 (8 mantissa bits through
    every layer; a real mismatch still moves the output by O(1))."""
    return common.agreement_tolerance(device) if args.dtype == "float32" else 0.1


def _count(params: Any) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


@dataclasses.dataclass
class Case:
    """What every case hands to `compare_and_time`."""
    name: str                         # the row's label
    fn: Callable[..., Any]            # the diffax program, fn(params, *inputs)
    jax_args: tuple[Any, ...]         # (params, *inputs) as jax arrays
    torch_fn: Callable[[], Any]       # one torch forward, no arguments
    to_numpy: Callable[[Any, Any], tuple[np.ndarray, np.ndarray]]  # (diffax out, torch out) -> comparable arrays
    parameters: int                   # model parameters (both libraries hold the same)


def compare_and_time(case: Case, args: argparse.Namespace, device: Any, peak: dict[str, Any]) -> dict[str, Any]:
    """Compiles the diffax program, checks both libraries agree, times them interleaved; one table row.

    Each library's first call is its warm-up (torch's kernel selection, the allocator; jax has compiled
    before it); the `--repeats` timed calls follow, alternating diffax and torch."""
    start = time.perf_counter()
    program = common.compile_jax(case.fn, *case.jax_args)
    diffax_call = common.jax_blocking(program.compiled, *case.jax_args)
    torch_call = common.torch_blocking(case.torch_fn, device)
    (got, d_first), (want, t_first) = common.timed(diffax_call), common.timed(torch_call)
    err = common.rel_err(*case.to_numpy(got, want))
    del got, want
    common.check_agreement(case.name, err, _tolerance(args, device))
    timing = common.time_interleaved({"diffax": diffax_call, "torch": torch_call}, repeats=args.repeats, warmup=0)
    return common.case_row(
        case.name, diffax=timing["diffax"], torch=timing["torch"], program=program, flops=program.flops,
        peak=peak, max_rel_err=err, first_call_s=(d_first, t_first),
        torch_peak=common.torch_peak_bytes(torch_call, device), group="forward", interleaved=True,
        parameters=case.parameters, case_s=time.perf_counter() - start, dtype=args.dtype,
        torch_compile=args.torch_compile)


def _label(args: argparse.Namespace, full: str, small: str) -> str:
    return (small if args.quick else full) + _suffix(args)


# ----------------------------------------------------------------------------- cases


def dit_rows(args: argparse.Namespace, device: Any, peak: dict[str, Any]) -> list[dict[str, Any]]:
    """DiT-XL/2 (or DiT-S/2 with --quick) on 32x32x4 latents, batch 2, random labels and timesteps."""
    preset = "DiT-S/2" if args.quick else "DiT-XL/2"
    base = DiTConfig.preset(preset, sample_size=32, num_embeds_ada_norm=1000, freq_shift=1.0, norm_eps=1e-5)
    module, params, model = _twin(models.torch_dit(base).to(device), args)
    net, call = DiT(module.config), _compiled(model, args)
    rng = np.random.default_rng(0)
    b = 2
    x = rng.standard_normal((b, 32, 32, base.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, b).astype(np.int32)
    y = rng.integers(0, 1000, b).astype(np.int32)
    tx, tt, ty = (_nchw(x, device, _torch_dtype(args)), _tensor(t.astype(np.int64), device),
                  _tensor(y.astype(np.int64), device))
    case = Case(f"{preset} 32x32 b{b}{_suffix(args)}",
                lambda p, x, t, y: net.apply({"params": p}, x, t, class_labels=y),
                (params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)),
                lambda: call(tx, timestep=tt, class_labels=ty).sample,
                lambda got, want: (np.asarray(got), _nhwc(want)), _count(params))
    return [compare_and_time(case, args, device, peak)]


def _unet_inputs(config: dict[str, Any], batch: int, seed: int) -> dict[str, np.ndarray]:
    """Latents, timesteps and 77-token text states (and SDXL's added embeddings) for a U-Net config."""
    rng = np.random.default_rng(seed)
    side = config["sample_size"]
    out = dict(x=rng.standard_normal((batch, side, side, config["in_channels"])).astype(np.float32),
               t=rng.integers(0, 1000, batch).astype(np.int32),
               ctx=rng.standard_normal((batch, TOKENS, config["cross_attention_dim"])).astype(np.float32))
    if config.get("addition_embed_type") == "text_time":
        out["text_embeds"] = rng.standard_normal((batch, models.sdxl_text_embeds_dim(config))).astype(np.float32)
        # original size, crop top-left, target size, as SDXL pipelines pass them
        out["time_ids"] = np.tile(np.array([[8 * side, 8 * side, 0, 0, 8 * side, 8 * side]], np.float32), (batch, 1))
    return out


def _unet_jax(module: Any) -> Callable[..., Any]:
    def fn(p, x, t, ctx, added):
        return module.apply({"params": p}, x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)
    return fn


def _unet_torch_args(inp: dict[str, np.ndarray], device: Any, dtype: Any
                     ) -> tuple[Any, Any, Any, dict[str, Any] | None]:
    added = None
    if "text_embeds" in inp:
        added = {"text_embeds": _tensor(inp["text_embeds"], device, dtype),
                 "time_ids": _tensor(inp["time_ids"], device, dtype)}
    return (_nchw(inp["x"], device, dtype), _tensor(inp["t"].astype(np.int64), device),
            _tensor(inp["ctx"], device, dtype), added)


def _unet_jax_args(params: Any, inp: dict[str, np.ndarray]) -> tuple[Any, ...]:
    added = None
    if "text_embeds" in inp:
        added = {"text_embeds": jnp.asarray(inp["text_embeds"]), "time_ids": jnp.asarray(inp["time_ids"])}
    return params, jnp.asarray(inp["x"]), jnp.asarray(inp["t"]), jnp.asarray(inp["ctx"]), added


def sd15_rows(args: argparse.Namespace, device: Any, peak: dict[str, Any]) -> list[dict[str, Any]]:
    """SD 1.5's U-Net with 77 text tokens, batch 1 and 2 (one model, two rows)."""
    config = models.SMALL_SD15_UNET if args.quick else models.SD15_UNET
    module, params, model = _twin(models.torch_unet(config).to(device), args)
    call = _compiled(model, args)
    side, rows = config["sample_size"], []
    for batch in (1, 2):
        inp = _unet_inputs(config, batch, seed=batch)
        tx, tt, tctx, _ = _unet_torch_args(inp, device, _torch_dtype(args))
        case = Case(f"{_label(args, 'SD1.5', 'SD1.5-small')} UNet {side}x{side} b{batch}", _unet_jax(module),
                    _unet_jax_args(params, inp), lambda: call(tx, tt, tctx).sample,
                    lambda got, want: (np.asarray(got), _nhwc(want)), _count(params))
        rows.append(compare_and_time(case, args, device, peak))
        del case
        models.free()
    return rows


def sdxl_rows(args: argparse.Namespace, device: Any, peak: dict[str, Any]) -> list[dict[str, Any]]:
    """SDXL base's U-Net, batch 1: on a CPU one library at a time (see the module docstring), interleaved on
    a GPU, which holds both."""
    import diffusers

    one_at_a_time = common.one_library_at_a_time(device)
    config = models.SMALL_SDXL_UNET if args.quick else models.SDXL_UNET
    side = config["sample_size"]
    name = f"{_label(args, 'SDXL', 'SDXL-small')} UNet {side}x{side} b1" + (" (not interleaved)" if one_at_a_time
                                                                             else "")
    inp = _unet_inputs(config, 1, seed=3)
    start = time.perf_counter()
    watch = common.Stopwatch("sdxl")
    model = models.torch_unet(config).to(device)
    dtype = _torch_dtype(args)
    with models.saved(model) as folder:
        # Phase 1, torch: the reference output and the first call's time; on a CPU the model is then freed.
        targs = _unet_torch_args(inp, device, dtype)
        call = _compiled(model.to(dtype), args)
        torch_call = common.torch_blocking(lambda: call(*targs[:3], added_cond_kwargs=targs[3]).sample, device)
        want, t_first = common.timed(torch_call)
        want = _nhwc(want)
        if one_at_a_time:
            del model, call, torch_call
            models.free()
        watch.lap("torch built, saved, reference computed")

        # Phase 2, diffax: load the same weights, check, time (on a GPU beside torch); on a CPU then freed.
        module, params = convert.load(folder, dtype=args.dtype, param_dtype=args.dtype)
        params = models.to_device(params)
        parameters = _count(params)
        jargs = _unet_jax_args(params, inp)
        del params
        watch.lap("converted and placed (convert.load)")
        program = common.compile_jax(_unet_jax(module), *jargs)
        watch.lap("diffax compiled")
        diffax_call = common.jax_blocking(program.compiled, *jargs)
        got, d_first = common.timed(diffax_call)
        err = common.rel_err(np.asarray(got), want)
        del got, want
        common.check_agreement(name, err, _tolerance(args, device))
        if one_at_a_time:
            d_timing = common.time_interleaved({"diffax": diffax_call}, repeats=args.repeats, warmup=0)["diffax"]
        else:
            timing = common.time_interleaved({"diffax": diffax_call, "torch": torch_call}, repeats=args.repeats,
                                             warmup=0)
            d_timing, t_timing = timing["diffax"], timing["torch"]
        program = dataclasses.replace(program, compiled=None)  # keeps the measurements, drops the executable
        del diffax_call, jargs
        models.free()
        watch.lap("diffax checked and timed")

        if one_at_a_time:  # Phase 3, torch again, from the folder diffax read: one untimed warm-up call.
            model = diffusers.UNet2DConditionModel.from_pretrained(folder).eval().to(device, dtype)
            call = _compiled(model, args)
            torch_call = common.torch_blocking(lambda: call(*targs[:3], added_cond_kwargs=targs[3]).sample,
                                               device)
            t_timing = common.time_interleaved({"torch": torch_call}, repeats=args.repeats, warmup=1)["torch"]
        torch_peak = common.torch_peak_bytes(torch_call, device)
        del model, call, torch_call
    models.free()
    return [common.case_row(
        name, diffax=d_timing, torch=t_timing, program=program, flops=program.flops, peak=peak, max_rel_err=err,
        first_call_s=(d_first, t_first), torch_peak=torch_peak, group="forward", interleaved=not one_at_a_time,
        parameters=parameters, case_s=time.perf_counter() - start, dtype=args.dtype,
        torch_compile=args.torch_compile)]


def vae_rows(args: argparse.Namespace, device: Any, peak: dict[str, Any]) -> list[dict[str, Any]]:
    """SD's VAE decoder: [1, 64, 64, 4] latents -> [1, 512, 512, 3] images (32 -> 256 with --quick)."""
    config = models.SMALL_SD_VAE if args.quick else models.SD_VAE
    module, params, model = _twin(models.torch_vae(config).to(device), args)
    decode = _compiled(model.decode, args)
    side = config["sample_size"] // 8
    z = np.random.default_rng(4).standard_normal((1, side, side, config["latent_channels"])).astype(np.float32)
    tz = _nchw(z, device, _torch_dtype(args))
    case = Case(f"{_label(args, 'SD', 'SD-small')} VAE decode {side}x{side} -> {8 * side}x{8 * side} b1",
                lambda p, z: module.apply({"params": p}, z, method="decode"), (params, jnp.asarray(z)),
                lambda: decode(tz).sample, lambda got, want: (np.asarray(got), _nhwc(want)), _count(params))
    return [compare_and_time(case, args, device, peak)]


def _token_ids(batch: int, vocab: int, seed: int) -> np.ndarray:
    """[batch, 77] prompts as the CLIP tokenizer pads them for SD 1.x: start-of-text, words, end-of-text
    padded with end-of-text (the two highest ids of the vocabulary)."""
    rng = np.random.default_rng(seed)
    bos, eos = vocab - 2, vocab - 1
    ids = np.full((batch, TOKENS), eos, np.int64)
    for row in range(batch):
        n = int(rng.integers(5, 30))
        ids[row, 0] = bos
        ids[row, 1:n + 1] = rng.integers(1, bos, n)
    return ids


def clip_rows(args: argparse.Namespace, device: Any, peak: dict[str, Any]) -> list[dict[str, Any]]:
    """CLIP-L's text encoder on 77 tokens, batch 1 and 2: last hidden states and the pooled output."""
    config = models.SMALL_CLIP_TEXT if args.quick else models.CLIP_L_TEXT
    module, params, model = _twin(models.torch_clip_text(config).to(device), args)
    call, rows = _compiled(model, args), []
    for batch in (1, 2):
        ids = _token_ids(batch, config["vocab_size"], seed=batch)
        tids = _tensor(ids, device)

        def fn(p, ids):
            out = module.apply({"params": p}, ids)
            return out.last_hidden_state, out.pooler_output

        def both(got, want):  # [B, 77, D] and [B, D], flattened into one comparison
            g = np.concatenate([np.asarray(got[0], np.float32).ravel(), np.asarray(got[1], np.float32).ravel()])
            w = np.concatenate([want.last_hidden_state.float().cpu().numpy().ravel(),
                                want.pooler_output.float().cpu().numpy().ravel()])
            return g, w

        case = Case(f"{_label(args, 'CLIP-L', 'CLIP-small')} text encoder {TOKENS} tokens b{batch}", fn,
                    (params, jnp.asarray(ids, jnp.int32)), lambda: call(tids), both, _count(params))
        rows.append(compare_and_time(case, args, device, peak))
    return rows


def controlnet_rows(args: argparse.Namespace, device: Any, peak: dict[str, Any]) -> list[dict[str, Any]]:
    """SD 1.5 ControlNet on a conditioning image, its residuals into the SD 1.5 U-Net: one call, batch 1."""
    unet_config = models.SMALL_SD15_UNET if args.quick else models.SD15_UNET
    cn_config = models.SMALL_SD15_CONTROLNET if args.quick else models.SD15_CONTROLNET
    unet_module, unet_params, unet = _twin(models.torch_unet(unet_config).to(device), args)
    cn_module, cn_params, controlnet = _twin(models.torch_controlnet(cn_config, seed=1).to(device), args)
    params = {"unet": unet_params, "controlnet": cn_params}
    del unet_params, cn_params
    unet, controlnet = _compiled(unet, args), _compiled(controlnet, args)
    inp = _unet_inputs(unet_config, 1, seed=5)
    side = unet_config["sample_size"]
    image = np.random.default_rng(6).uniform(0, 1, (1, 8 * side, 8 * side, 3)).astype(np.float32)
    tx, tt, tctx, _ = _unet_torch_args(inp, device, _torch_dtype(args))
    timage = _nchw(image, device, _torch_dtype(args))

    def fn(p, x, t, ctx, image):
        down, mid = cn_module.apply({"params": p["controlnet"]}, x, t, encoder_hidden_states=ctx,
                                    controlnet_cond=image)
        return unet_module.apply({"params": p["unet"]}, x, t, encoder_hidden_states=ctx,
                                 down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def torch_fn():
        down, mid = controlnet(tx, tt, tctx, controlnet_cond=timage, return_dict=False)
        return unet(tx, tt, tctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    case = Case(f"{_label(args, 'SD1.5', 'SD1.5-small')} ControlNet+UNet {8 * side}x{8 * side} b1", fn,
                (params, jnp.asarray(inp["x"]), jnp.asarray(inp["t"]), jnp.asarray(inp["ctx"]), jnp.asarray(image)),
                torch_fn, lambda got, want: (np.asarray(got), _nhwc(want)), _count(params))
    return [compare_and_time(case, args, device, peak)]


CASE_FUNCTIONS = {"dit": dit_rows, "sd15": sd15_rows, "sdxl": sdxl_rows, "vae": vae_rows, "clip": clip_rows,
                  "controlnet": controlnet_rows}


def results_name(args: argparse.Namespace) -> str:
    """The results file's name: forward[_quick][_bfloat16][_torch_compile][_<cases>], the cases named only
    when some are left out, so that a partial run never overwrites a whole one."""
    parts = (["forward"] + (["quick"] if args.quick else []) + ([] if args.dtype == "float32" else [args.dtype])
             + (["torch_compile"] if args.torch_compile else [])
             + ([] if set(args.cases) == set(CASES) else args.cases))
    return "_".join(parts)


def run(args: argparse.Namespace, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs the chosen cases one after the other, each freeing its models before the next; writes
    bench/results/<results_name(args)>.json after each case and returns the rows.
    `peak` is `common.matmul_peak(device)` when the caller has measured it already."""
    device = common.setup_torch(args.torch_threads)
    peak = peak or common.matmul_peak(device)
    rows, seconds = [], {}
    for name in args.cases:
        start = time.perf_counter()
        case_rows = CASE_FUNCTIONS[name](args, device, peak)
        models.free()
        seconds[name] = time.perf_counter() - start
        rows.extend(case_rows)
        # A full-size run takes many minutes per case: show and keep each case's rows as soon as they exist.
        print(f"forward: {name} took {seconds[name]:.0f} s\n{common.format_table(case_rows)}", flush=True)
        common.write_json(results_name(args), {
            "benchmark": "forward", "args": vars(args), "machine": common.machine_info(), "matmul_peak": peak,
            "case_seconds": seconds, "rows": rows})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run from the command line and print the table."""
    common.print_table(run(parse_args(argv)))


if __name__ == "__main__":
    main()
