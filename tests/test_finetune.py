"""Fine-tuning in the train loop (diffax.train.finetune): full, LoRA and TuneQDM from a pretrained workdir.

A tiny digits U-Net is pretrained for a few steps on digits 0-4 (data.classes); each mode then tunes it on 5-9
through `train_and_evaluate`. Checked: the frozen base is bit-identical after training (every leaf but the
trained ones), the optimizer state holds the trainable tree only, a resumed run ends where an uninterrupted
one does, the exported LoRA file reads back (diffax.convert.lora) to the weights the run samples with, and on
a tiny random Stable Diffusion pipeline diffusers' `load_lora_weights` of an exported file changes the U-Net
output exactly as diffax's merge does; sample.py samples a TuneQDM workdir.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from test_train import TINY_FLAGS, tiny_config  # noqa: E402

from diffax.convert.lora import read_lora  # noqa: E402
from diffax.data.pipeline import make_source  # noqa: E402
from diffax.models import build_model  # noqa: E402
from diffax.pipelines.lora import apply as apply_lora  # noqa: E402
from diffax.quant.quantize import flatten  # noqa: E402
from diffax.quant.tuneqdm import load_scales  # noqa: E402
from diffax.train import finetune  # noqa: E402
from diffax.train.loop import train_and_evaluate  # noqa: E402


def _config(steps: int, **train):
    c = tiny_config(steps=steps)  # its batch size too: the base's programs are the other tiny runs' (cached)
    c.train.checkpoint_every = 2
    c.train.log_every = 2
    for key, value in train.items():
        c.train[key] = value
    return c


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny digits U-Net pretrained for 2 steps on digits 0-4."""
    workdir = tmp_path_factory.mktemp("base")
    c = _config(2)
    c.data.classes = (0, 1, 2, 3, 4)
    train_and_evaluate(c, workdir)
    return workdir


def _tune(workdir: Path, base: Path, mode: str, steps: int, **options):
    c = _config(steps, init_from=str(base), finetune=mode)
    c.data.classes = (5, 6, 7, 8, 9)
    block = "lora" if mode == "lora" else "tuneqdm"
    for key, value in options.items():
        c.train[block][key] = value
    return c, train_and_evaluate(c, workdir)


def _assert_same_tree(a, b):
    fa, fb = flatten(jax.device_get(a)), flatten(jax.device_get(b))
    assert set(fa) == set(fb)
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg="/".join(path))


def test_class_subset_keeps_only_those_labels():
    c = tiny_config()
    c.data.classes = (5, 7)
    source = make_source(c.data)
    labels = {int(source[i]["label"]) for i in range(len(source))}
    assert labels == {5, 7} and 300 < len(source) < 400  # ~180 of each digit
    c.data.classes = (3, 12)
    with pytest.raises(ValueError, match=r"data.classes: \[12\] are not labels"):
        make_source(c.data)


def test_tuneqdm_trains_the_scales_only_and_resumes_exactly(base, tmp_path):
    config, state = _tune(tmp_path / "whole", base, "tuneqdm", 4, groups=2, bits=8)
    # The frozen base after 4 steps is the quantized pretrained model, every leaf bit for bit.
    base_params = finetune.load_base(str(base), build_model(config.model).config)
    qp = finetune.quantize_base(base_params, config.train)
    _assert_same_tree(state.frozen.params, qp.params)
    # Every leaf of the tuned view but the kernel scales is the base's own; the scales moved.
    scales = finetune.flat_scales(state.params)
    for group in range(2):
        view = flatten(jax.device_get(finetune.tuneqdm_view(qp, state.params, jnp.full((1,), group * 500),
                                                            num_train_timesteps=1000, groups=2)))
        for path, leaf in flatten(qp.params).items():
            if path[-1] != "kernel_scale":
                np.testing.assert_array_equal(np.asarray(view[path]), np.asarray(leaf), err_msg="/".join(path))
    assert max(float(jnp.abs(v - 1).max()) for v in scales.values()) > 0
    # Adam's moments exist for the scales alone (+ scalar counts).
    n = sum(v.size for v in scales.values())
    assert sum(np.size(x) for x in jax.tree.leaves(state.opt_state)) < 2 * n + 8
    # The exported file loads on top of the shared base and holds the EMA scales.
    loaded = load_scales(tmp_path / "whole" / "export" / finetune.SCALES_FILE, qp)
    _assert_same_tree(finetune.nest_scales(loaded.scales), state.ema_params)
    # Stopped at step 2 and resumed: the same scales as the uninterrupted run.
    _tune(tmp_path / "split", base, "tuneqdm", 2, groups=2, bits=8)
    _, resumed = _tune(tmp_path / "split", base, "tuneqdm", 4, groups=2, bits=8)
    _assert_same_tree(resumed.params, state.params)
    _assert_same_tree(resumed.ema_params, state.ema_params)


def test_lora_freezes_the_base_exports_and_resumes(base, tmp_path):
    config, state = _tune(tmp_path / "lora", base, "lora", 2, rank=2, alpha=4.0, targets="all")
    model = build_model(config.model)
    base_params = finetune.load_base(str(base), model.config)
    _assert_same_tree(state.frozen, base_params)
    assert all(leaf.shape[-1] == 2 or leaf.shape[0] == 2 for leaf in jax.tree.leaves(state.params))
    up = [v for p, v in flatten(state.params).items() if p[-1] == "lora_up"]
    assert max(float(jnp.abs(u).max()) for u in up) > 0  # the factors trained (up starts at zero)
    # The exported diffusers-format file reads back to the weights the run samples with.
    merged = finetune.merge_lora(base_params, state.ema_params, 4.0 / 2)
    layers = read_lora(tmp_path / "lora" / "export" / finetune.LORA_FILE, {"unet": (model, base_params)})["unet"]
    assert {tuple(k.split("/")) for k in layers} == {p[:-1] + ("kernel",) for p in flatten(state.params)
                                                     if p[-1] == "lora_up"}
    from_file = jax.device_get(apply_lora(base_params, [layers], [1.0]))
    for path, leaf in flatten(merged).items():
        np.testing.assert_allclose(np.asarray(flatten(from_file)[path]), np.asarray(leaf), rtol=1e-6, atol=1e-7,
                                   err_msg="/".join(path))
    # Resumed with more steps on the same base; another base is refused by name.
    _, resumed = _tune(tmp_path / "lora", base, "lora", 3, rank=2, alpha=4.0, targets="all")
    assert int(resumed.step) == 3
    _assert_same_tree(resumed.frozen, base_params)
    other = tmp_path / "other_base"
    c = _config(1)
    c.seed = 1
    train_and_evaluate(c, other)
    with pytest.raises(finetune.FinetuneError, match="this run was tuned on the base"):
        _tune(tmp_path / "lora", other, "lora", 4, rank=2, alpha=4.0, targets="all")


def test_full_finetuning_starts_from_the_base(base, tmp_path):
    config, state = _tune(tmp_path / "full", base, "full", 1)
    base_params = finetune.load_base(str(base), build_model(config.model).config)
    assert state.frozen is None
    assert jax.tree.structure(state.params) == jax.tree.structure(base_params)
    # One update of lr 0 (warm-up step 0) leaves the weights where they started: the pretrained ones.
    _assert_same_tree(state.params, base_params)


def test_bad_options_and_bases_are_named(base, tmp_path):
    c = _config(1, finetune="lora")
    with pytest.raises(finetune.FinetuneError, match="set train.init_from"):
        train_and_evaluate(c, tmp_path / "a")
    c = _config(1, finetune="lora", init_from=str(base))
    c.model.block_out_channels = (8, 8)
    with pytest.raises(finetune.FinetuneError, match=r"do not match the config's model block \(\d+ keys differ"):
        train_and_evaluate(c, tmp_path / "b")
    c = _config(1, finetune="lora", init_from=str(base))
    c.train.lora.targets = "no_such_layer"
    with pytest.raises(finetune.FinetuneError, match="train.lora.targets='no_such_layer'"):
        train_and_evaluate(c, tmp_path / "c")
    c = _config(1, finetune="tuneqdm", init_from=str(base))
    c.train.tuneqdm.bits = 3
    with pytest.raises(finetune.FinetuneError, match="'train.tuneqdm.bits' must be 8 or 4"):
        train_and_evaluate(c, tmp_path / "d")


@pytest.mark.slow  # a TuneQDM run sampled by sample.py in a subprocess (about 20 s): `make test-slow`
def test_sample_py_applies_the_scale_set_of_each_timestep(base, tmp_path):
    workdir = tmp_path / "q4"
    overrides = [*TINY_FLAGS, "--config.train.steps=2", "--config.train.checkpoint_every=2",
                 f"--config.train.init_from={base}",
                 "--config.train.tuneqdm.groups=2", "--config.data.classes=(5, 6, 7, 8, 9)"]
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}",
                          f"--workdir={workdir}", "--quantize=int4", *overrides], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (workdir / "export" / finetune.SCALES_FILE).is_file()
    out = tmp_path / "q4.npz"
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={workdir}", "--num_samples=4",
                          "--labels=5,6,7,8", "--steps=2", f"--out={out}"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.load(out)["images"].shape == (4, 16, 16, 1)
    # The view sampling uses picks each call's scale set by its timestep.
    from diffax.train.checkpoint import restore_for_sampling
    config, scales, _ = restore_for_sampling(workdir)
    assert config.train.finetune == "tuneqdm" and config.train.tuneqdm.bits == 4
    model = build_model(config.model)
    (qp, trained), view = finetune.sampling_params(config, scales, model, workdir)
    name = next(iter(finetune.flat_scales(trained)))
    path = tuple(name.split("/"))[:-1] + ("kernel_scale",)
    changed = finetune.nest_scales({k: jnp.asarray(v).at[1].multiply(2.0)
                                    for k, v in finetune.flat_scales(trained).items()})
    for t, group in ((10, 0), (990, 1)):
        got = flatten(view((qp, changed), jnp.full((3,), t)))[path]
        want = flatten(qp.params)[path] * finetune.flat_scales(changed)[name][group]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_exported_lora_loads_into_diffusers_and_changes_the_output_as_diffax_does(tmp_path):
    """A UNet2DConditionModel's LoRA (attention projections and every conv, random nonzero factors, alpha !=
    rank) exported by `export_lora`: diffusers' StableDiffusionPipeline.load_lora_weights moves the U-Net's
    output by what diffax's merged weights move it (fp32, relative 1e-4 as the LoRA parity tests)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from pipeline_fixtures import build_sd_pipeline, diffusers_pipeline

    from diffax import convert
    folder = build_sd_pipeline(tmp_path / "sd")
    module, params = convert.load(folder, subfolder="unet")
    params = jax.device_get(params)
    paths = finetune.lora_targets(params, r"(/(to_q|to_k|to_v|to_out_0)|conv\d?)/kernel$")
    assert any(len(flatten(params)[p].shape) == 4 for p in paths)  # convs included
    lora = finetune.init_lora(params, paths, 3, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)
    alpha = 6.0
    file = finetune.export_lora(tmp_path / "lora" / finetune.LORA_FILE, lora, alpha=alpha)
    merged = finetune.merge_lora(params, lora, alpha / 3)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    text = rng.standard_normal((1, 5, 32)).astype(np.float32)
    ours = np.asarray(module.apply({"params": merged}, x, jnp.array([500]), encoder_hidden_states=text))
    plain = np.asarray(module.apply({"params": params}, x, jnp.array([500]), encoder_hidden_states=text))
    pipe = diffusers_pipeline(str(folder))
    pipe.load_lora_weights(str(file.parent), adapter_name="tuned")
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([500]),
                           encoder_hidden_states=torch.from_numpy(text)).sample.permute(0, 2, 3, 1).numpy()
    pipe.unload_lora_weights()
    assert np.abs(ours - plain).max() > 1e-2 * np.abs(plain).max()  # the LoRA changes the output
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


@pytest.mark.slow  # seven processes and compilations of the tiny U-Net: minutes even on an idle machine
def test_finetune_digits_study_quick(tmp_path):
    """`python -m diffax.studies.finetune_digits --quick`: every row measured, the table and plot written."""
    run = subprocess.run([sys.executable, "-m", "diffax.studies.finetune_digits", "--quick",
                          f"--workdir={tmp_path}", "--nowrite_docs"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    for mode in ("no tuning (int8 base)", "| full |", "| lora |", "| tuneqdm |"):
        assert mode in table
    rows = {m: json.loads((tmp_path / f"{m}.json").read_text()) for m in ("full", "lora", "tuneqdm")}
    assert rows["lora"]["trainable"] < rows["full"]["trainable"]
    assert rows["tuneqdm"]["trainable"] < rows["full"]["trainable"]
    assert rows["tuneqdm"]["saved_bytes"] < rows["full"]["saved_bytes"]
    assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["fid"]) and r["step_mib"] > 0 for r in rows.values())
    assert (tmp_path / "finetune_digits.png").stat().st_size > 0
