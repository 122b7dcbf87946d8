"""sample.py writes the documented files; bad requests get one-line errors; every sampler name resolves."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffax.schedulers.names import SAMPLER_NAMES, parse_options, scheduler_for
from diffax.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run")
    config = tiny_config(steps=2)
    config.train.sample_every = 2  # the loop's own grid, with the pipeline sample.py uses
    train_and_evaluate(config, path)
    return path


def test_training_writes_sample_grids(workdir):
    grid = np.asarray(Image.open(workdir / "samples" / "step_000002.png"))
    assert grid.shape == ((10 * 17 + 1) * 4, (10 * 17 + 1) * 4)  # 10 classes x 10 samples, 16 px tiles


def _sample(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={workdir}", "--steps=3", *args],
                          capture_output=True, text=True, cwd=workdir)


def test_npz_and_png(workdir):
    result = _sample(workdir, "--num_samples=13", f"--out={workdir / 's.npz'}")
    assert result.returncode == 0, result.stderr
    data = np.load(workdir / "s.npz")
    assert data["images"].shape == (13, 16, 16, 1) and data["images"].dtype == np.uint8
    assert data["labels"].dtype == np.int64
    np.testing.assert_array_equal(data["labels"], np.arange(13) % 10)  # no --labels: cycles the classes

    result = _sample(workdir, "--num_samples=20", "--labels=3,7", "--sampler=dpm++2m", "--guidance_scale=2",
                     f"--out={workdir / 's.png'},{workdir / 's2.npz'}")
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(workdir / "s.png"))
    # One row per label (3s, then 7s), 10 columns of 16x16 tiles with 1-pixel gaps, pixels shown 4x (64 // 16).
    assert grid.shape == ((2 * 17 + 1) * 4, (10 * 17 + 1) * 4)
    both = np.load(workdir / "s2.npz")
    np.testing.assert_array_equal(both["labels"], [3, 7] * 10)
    tile = lambda r, c: grid[4 * (1 + 17 * r):4 * (1 + 17 * r) + 64:4, 4 * (1 + 17 * c):4 * (1 + 17 * c) + 64:4]
    np.testing.assert_array_equal(tile(0, 0), both["images"][0, ..., 0])  # first 3
    np.testing.assert_array_equal(tile(1, 0), both["images"][1, ..., 0])  # first 7


def test_same_seed_same_images_any_batch(workdir):
    """Sample k's noise depends on (seed, k) only: the first 5 of 13 equal a run of 5."""
    _sample(workdir, "--num_samples=5", f"--out={workdir / 'a.npz'}")
    _sample(workdir, "--num_samples=13", f"--out={workdir / 'b.npz'}")
    a, b = np.load(workdir / "a.npz")["images"], np.load(workdir / "b.npz")["images"]
    np.testing.assert_array_equal(a, b[:5])


@pytest.mark.parametrize("args, message", [
    (["--labels=3,10"], "label 10 is outside the model's classes 0..9"),
    (["--sampler=nope"], "unknown sampler 'nope'"),
    (["--sampler=euler", "--sampler_options=lambda_min_clipped=-5.1"],
     "EulerDiscreteScheduler has no option(s) ['lambda_min_clipped']"),
    (["--sampler_options=eta"], "sampler option 'eta' is not key=value"),
    (["--num_samples=0"], "--num_samples must be >= 1, got 0"),  # used to divide by zero in GroupNorm
    (["--num_samples=-3", "--labels=1,2"], "--num_samples must be >= 1, got -3"),
    (["--steps=0"], "--steps must be >= 1, got 0"),  # used to mean the config's default
    (["--batch_size=0"], "--batch_size must be >= 1, got 0"),
])
def test_bad_requests(workdir, args, message):
    result = _sample(workdir, *args, f"--out={workdir / 'x.png'}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_sampler_options_reach_the_sampler(workdir):
    """--sampler_options sets config fields: DDIM with eta=1 adds noise, so the images change."""
    _sample(workdir, "--num_samples=4", f"--out={workdir / 'eta0.npz'}")
    _sample(workdir, "--num_samples=4", "--sampler_options=eta=1.0,timestep_spacing=trailing",
            f"--out={workdir / 'eta1.npz'}")
    a, b = np.load(workdir / "eta0.npz")["images"], np.load(workdir / "eta1.npz")["images"]
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0
    assert parse_options(["eta=1", "timestep_spacing=leading", "clip_sample=False", "x='1'"]) == {
        "eta": 1, "timestep_spacing": "leading", "clip_sample": False, "x": "1"}


def test_weights_that_do_not_match_the_saved_config(workdir, tmp_path):
    """A workdir whose saved config builds another model than its weights: one line naming the workdir, the
    step and the first keys that differ (it used to be a Flax ScopeParamShapeError traceback)."""
    import json
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(workdir / "checkpoints", edited / "checkpoints")
    for path in (edited / "checkpoints").glob("*/config/metadata"):
        saved = json.loads(path.read_text())
        saved["model"]["block_out_channels"] = [8, 32]  # the second level's convolutions change shape
        path.write_text(json.dumps(saved))
    result = _sample(edited, "--num_samples=2", f"--out={tmp_path / 'x.npz'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after Orbax's log line about the read-only directory
    assert last.startswith(f"error: {edited} step 2: the weights do not match the model of the saved config "
                           f"(100 keys differ, weights vs config: "), result.stderr
    assert "(16,) vs (32,)" in last and last.endswith("; ...)"), last
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.slow  # sample.py --quantize in subprocesses (about 18 s): `make test-slow`; quantized pipelines: test_quant_switch.py
def test_quantize(workdir):
    """--quantize: the tiny digits U-Net (2 training steps, so close to random weights, which the sampler's
    3 steps amplify) samples within 32 levels (max) / 3 levels (mean) of its fp32 uint8 samples in int8
    (measured 17 / 1.7); int4 with groups of 16 rows differs more (measured 197 / 23)."""
    runs = {}
    for mode, flags in (("fp32", []), ("int8", ["--quantize=int8"]),
                        ("int4", ["--quantize=int4", "--quantize_group_size=16"])):
        result = _sample(workdir, "--num_samples=10", *flags, f"--out={workdir / f'q_{mode}.npz'}")
        assert result.returncode == 0, result.stderr
        assert ("kernels to" in result.stdout) == (mode != "fp32")
        runs[mode] = np.load(workdir / f"q_{mode}.npz")["images"].astype(np.int16)
    d8, d4 = np.abs(runs["int8"] - runs["fp32"]), np.abs(runs["int4"] - runs["fp32"])
    assert d8.max() <= 32 and d8.mean() <= 3, (d8.max(), d8.mean())
    assert d8.max() > 0 and d4.mean() > d8.mean()
    result = _sample(workdir, "--quantize_group_size=16", f"--out={workdir / 'x.npz'}")
    assert result.returncode == 1 and result.stderr.strip() == "error: --quantize_group_size needs --quantize=int8 or int4"


def test_no_checkpoint(tmp_path):
    result = _sample(tmp_path, f"--out={tmp_path / 'x.png'}")
    assert result.returncode != 0 and "no checkpoints/ folder" in result.stderr


@pytest.mark.parametrize("name", sorted(SAMPLER_NAMES))
def test_every_short_name_builds(name):
    schedule = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                    prediction_type="epsilon", rescale_betas_zero_snr=False)
    scheduler = scheduler_for(name, schedule)
    assert type(scheduler).__name__ == SAMPLER_NAMES[name][0]
    for key, value in SAMPLER_NAMES[name][1].items():
        assert getattr(scheduler, key) == value


def test_converted_dit_checkpoint(tmp_path):
    """sample.py --checkpoint takes a converted DiT (here a diffusers folder of a tiny random latent DiT)."""
    import jax

    from diffax import convert
    from diffax.models import init_params, make_module
    from diffax.models.dit import DiTConfig

    config = DiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_attention_heads=2,
                       attention_head_dim=16, num_layers=1, num_embeds_ada_norm=5)
    params = init_params(config, jax.random.key(0))
    convert.save(tmp_path / "dit", make_module(config), jax.device_get(params))
    args = [sys.executable, str(ROOT / "sample.py"), f"--checkpoint={tmp_path / 'dit'}", "--steps=3",
            "--num_samples=3", "--reference_guidance"]
    result = subprocess.run([*args, f"--out={tmp_path / 'lat.npz'}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = np.load(tmp_path / "lat.npz")
    assert data["latents"].shape == (3, 8, 8, 4) and data["latents"].dtype == np.float32
    assert np.all(np.isfinite(data["latents"]))
    np.testing.assert_array_equal(data["labels"], [0, 1, 2])
    result = subprocess.run([*args, f"--out={tmp_path / 'lat.png'}"], capture_output=True, text=True)
    assert result.returncode != 0 and "4-channel latents" in result.stderr


@pytest.mark.slow  # make demo-dit at toy size (about 18 s): `make test-slow`; DiT training and sampling pieces: test_dit.py
def test_dit_digits_recipe_learns_and_samples(tmp_path):
    """configs/dit_digits.py, shrunk, trains through the generic loop (loss falls) and sample.py samples
    its workdir with the learned variance (ddpm)."""
    import jax

    from configs.dit_digits import get_config
    from diffax.data import make_source, make_train_iterator
    from diffax.models import build_model, init_params
    from diffax.train.checkpoint import restore_for_sampling
    from diffax.train.loop import make_objective, model_batch
    from diffax.train.step import diffusion_loss

    c = get_config()
    c.model.attention_head_dim, c.model.num_layers, c.model.num_attention_heads = 16, 2, 2
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 40, 32, 5
    c.train.log_every, c.train.checkpoint_every, c.train.sample_every = 20, 20, 0
    train_and_evaluate(c, tmp_path)

    spec = build_model(c.model)
    objective = make_objective(c, spec)
    batch = model_batch(next(make_train_iterator(make_source(c.data), global_batch_size=256, seed=7)), spec)

    def eval_loss(params) -> float:  # the same images, timesteps and noise for both
        return float(diffusion_loss(spec, params, objective, batch, jax.random.key(0), train=False)[0])

    first = eval_loss(init_params(spec.config, jax.random.key(c.seed)))  # zero-init: outputs zeros
    last = eval_loss(restore_for_sampling(tmp_path)[1])
    assert last < 0.6 * first, (first, last)

    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={tmp_path}", "--sampler=ddpm",
                             "--steps=5", "--num_samples=4", f"--out={tmp_path / 's.npz'}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (4, 16, 16, 1) and data["images"].dtype == np.uint8
    np.testing.assert_array_equal(data["labels"], [0, 1, 2, 3])


@pytest.mark.slow  # train.py + sample.py in subprocesses (about 20 s): `make test-slow`; the conditional recipe runs above
def test_unconditional_model_trains_and_samples(tmp_path):
    """A UNet2DModel without a class table trains on the digits (their labels ignored) and samples: the
    loop's grid, and sample.py's N images without labels. Labels and guidance are refused, by name."""
    config = tiny_config(steps=2)
    config.model.num_class_embeds = None
    config.train.sample_every = 2
    train_and_evaluate(config, tmp_path)
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_000002.png"))
    assert grid.shape == ((10 * 17 + 1) * 4, (10 * 17 + 1) * 4)  # 100 samples, 10 columns

    result = _sample(tmp_path, "--num_samples=5", f"--out={tmp_path / 'u.npz'},{tmp_path / 'u.png'}")
    assert result.returncode == 0, result.stderr
    data = np.load(tmp_path / "u.npz")
    assert data.files == ["images"]
    assert data["images"].shape == (5, 16, 16, 1) and data["images"].dtype == np.uint8
    assert np.asarray(Image.open(tmp_path / "u.png")).shape == ((17 + 1) * 4, (5 * 17 + 1) * 4)  # one row

    for args, message in [(["--labels=1,2"], "this model is unconditional: it takes no labels"),
                          (["--guidance_scale=3"], "guidance_scale needs a model trained with null conditioning")]:
        result = _sample(tmp_path, *args, f"--out={tmp_path / 'x.npz'}")
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
