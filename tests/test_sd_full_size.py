"""Full-size parity (slow; `make test-slow`): the SD 1.5 U-Net, the SD VAE and CLIP ViT-L/14's text tower at
their released sizes (the configs of diffax/convert/single_file_configs.py), built in torch with random
weights, saved with `save_pretrained`, loaded with `diffax.convert.load`, and compared on one realistic
input each. fp32 tolerance: max|diffax - torch| / max|torch| < 1e-4.

Each test builds one model at a time and frees the torch model once its output is computed: the U-Net
alone is 860M parameters (3.4 GB in fp32, held twice while comparing).
"""
from __future__ import annotations

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffax import convert  # noqa: E402
from diffax.convert.single_file_configs import MODEL_TYPES  # noqa: E402

pytestmark = pytest.mark.slow

RTOL = 1e-4
SD1 = MODEL_TYPES["sd1"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def perturb_vectors(model, seed: int) -> None:
    """Norm scales and biases start at 1 / 0: move every 1-D tensor a little so that each one counts."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def report(name: str, err: float, start: float) -> None:
    print(f"{name}: relative error {err:.2e}, {time.perf_counter() - start:.0f} s")


def test_sd15_unet(tmp_path):
    start = time.perf_counter()
    class_name, values = SD1["unet"]
    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**values).eval()
    perturb_vectors(model, 1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)  # [B, H, W, C] latents of a 512x512 image
    t = np.array([500.0], np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)  # [B, 77, 768] CLIP-L text states
    with torch.no_grad():
        want = model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
    model.save_pretrained(tmp_path / "unet")
    del model
    gc.collect()

    module, params = convert.load(tmp_path / "unet")
    got = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, encoder_hidden_states=c))(params, x, t, ctx)
    err = rel_err(got, want)
    report("SD 1.5 UNet2DConditionModel (64x64x4 latent, 77 tokens)", err, start)
    assert err < RTOL


def test_sd_vae_decode(tmp_path):
    start = time.perf_counter()
    class_name, values = SD1["vae"]
    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**values).eval()
    perturb_vectors(model, 1)
    z = np.random.default_rng(2).standard_normal((1, 64, 64, 4)).astype(np.float32)  # a 512x512 image's latent
    with torch.no_grad():
        want = model.decode(nchw(z)).sample.permute(0, 2, 3, 1).numpy()
    assert want.shape == (1, 512, 512, 3)
    model.save_pretrained(tmp_path / "vae")
    del model
    gc.collect()

    module, params = convert.load(tmp_path / "vae")
    got = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(params, z)
    err = rel_err(got, want)
    report("SD AutoencoderKL decode (64x64x4 latent -> 512x512)", err, start)
    assert err < RTOL


def test_clip_l(tmp_path):
    start = time.perf_counter()
    class_name, values = SD1["text_encoder"]
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(transformers.CLIPTextConfig(**values)).eval()
    assert (model.config.vocab_size, model.config.max_position_embeddings) == (49408, 77)
    perturb_vectors(model, 1)
    # A tokenised prompt as SD 1.x pipelines pass it: BOS, 20 words, EOS, padded with EOS to 77.
    ids = np.full((1, 77), 49407, np.int64)
    ids[0, 0] = 49406
    ids[0, 1:21] = np.random.default_rng(2).integers(0, 49406, 20)
    with torch.no_grad():
        out = model(torch.from_numpy(ids))
        want_hidden, want_pooled = out.last_hidden_state.numpy(), out.pooler_output.numpy()
    model.save_pretrained(tmp_path / "text_encoder")
    del model, out
    gc.collect()

    module, params = convert.load(tmp_path / "text_encoder")
    got = jax.jit(lambda p, i: module.apply({"params": p}, i))(params, jnp.asarray(ids, jnp.int32))
    err = max(rel_err(got.last_hidden_state, want_hidden), rel_err(got.pooler_output, want_pooled))
    report("CLIP ViT-L/14 text model (77 tokens)", err, start)
    assert err < RTOL
