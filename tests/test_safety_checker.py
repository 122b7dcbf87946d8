"""Tests for CLIP's image towers (diffax.models.clip_vision), Stable Diffusion's safety checker
(diffax.models.safety_checker), their conversion, and the pipeline-side preprocessing (diffax.pipelines.safety).

Parity is against transformers' CLIPVisionModel / CLIPVisionModelWithProjection and diffusers'
StableDiffusionSafetyChecker built from tiny configs with every tensor randomised, saved with
`save_pretrained` and read back through `diffax.convert.load`. The checker's thresholds are set from the
torch model's own cosine similarities so that a batch of random images has flagged and unflagged images,
one of them flagged only through the special-care adjustment, with every score at least MARGIN away from
the rounding boundaries (so fp32 differences between torch and XLA cannot flip a flag).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from safetensors.torch import load_file, save_file

from diffax import convert
from diffax.models.clip_vision import CLIPVisionConfig, CLIPVisionModel, CLIPVisionWithProjectionConfig
from diffax.models.safety_checker import StableDiffusionSafetyCheckerConfig
from diffax.pipelines.safety import (ProcessorConfig, SafetyChecker, load_safety_checker, preprocess_for_safety_checker,
                                     read_processor_config, run_safety_checker)

# fp32 relative error budget (max-abs diff / max-abs output), DESIGN.md's parity bar.
RTOL = 1e-4
# Distance kept between every score (x 1000) and diffusers' rounding boundary 0.5 (round(s, 3) > 0 iff
# 1000 s > 0.5): 0.05 of a unit is 5e-5 in the score, ~100 times the fp32 torch / XLA difference.
MARGIN = 0.05
N = 8
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, projection_dim=24)
CHECKER_VISION = dict(TOWER, image_size=224, patch_size=32)  # CLIPImageProcessor's 224 x 224 input
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
            bos_token_id=62, eos_token_id=63)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def randomise(model):
    """Every tensor random (LayerNorm scales around 1), as released weights are."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if p.ndim == 1 else p.shape[-1] ** -0.5
            offset = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
            p.copy_(torch.randn_like(p) * scale + offset)


def sample_images(n, height, width, seed=0):
    """[n, H, W, 3] float32 in [0, 1]: noise over smooth gradients, different per image."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, None, :, None]
    tint = rng.random((n, 1, 1, 3), dtype=np.float32)
    return np.clip(0.6 * ramp * tint + 0.4 * rng.random((n, height, width, 3), dtype=np.float32), 0, 1)


def clip_processor_pixels(images):
    """diffusers' pipeline path: numpy_to_pil, then CLIPImageProcessor (PIL backend) -> NCHW float32."""
    processor = transformers.CLIPImageProcessor()
    return processor(VaeImageProcessor.numpy_to_pil(images), return_tensors="np")["pixel_values"]


def boundary_distance(scores):
    """min over scores of |1000 s - 0.5|: how far each is from flipping diffusers' round(s, 3) > 0."""
    return float(np.abs(np.asarray(scores, np.float64) * 1000 - 0.5).min())


def set_thresholds(model, pixel_values):
    """Thresholds on the torch checker for `pixel_values` [n, 3, 224, 224]: special-care concept 0 fires for
    the upper half of the images; concept 0 flags two of them outright; concept 1 flags one special-care
    image only through the +0.01 adjustment; concept 2 scores +0.0003 on one unflagged image, which
    diffusers' rounding to 3 decimals keeps unflagged; the others never fire. Returns (the expected flags,
    the image flagged through the adjustment)."""
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(torch.tensor(pixel_values))[1])
        special = cosine_distance(embeds, model.special_care_embeds).numpy().astype(np.float64)  # [N, 3]
        concept = cosine_distance(embeds, model.concept_embeds).numpy().astype(np.float64)  # [N, 17]
    n = len(special)
    special_w, concept_w = special.max(0) + 0.1, concept.max(0) + 0.1
    order = np.argsort(special[:, 0])
    special_w[0] = special[order[n // 2 - 1:n // 2 + 1], 0].mean()
    care = special[:, 0] > special_w[0]
    order = np.argsort(concept[:, 0])
    concept_w[0] = concept[order[-3:-1], 0].mean()  # two images above it (one more if it had special care)
    flagged0 = concept[:, 0] - concept_w[0] + 0.01 * care > 0
    candidates = [i for i in np.flatnonzero(care & ~flagged0)]
    target = max(candidates, key=lambda i: concept[i, 1])
    concept_w[1] = concept[target, 1] + 0.005  # score -0.005: above 0 only with the adjustment
    # concept 2: the highest unflagged image scores +0.0003, which diffusers rounds to 0.0: still unflagged
    # (images scoring higher are flagged already).
    flagged01 = (concept[:, :2] - concept_w[:2] + 0.01 * care[:, None] > 0).any(1)
    adjusted = np.where(flagged01, -np.inf, concept[:, 2] + 0.01 * care)
    rounded = int(np.argmax(adjusted))
    concept_w[2] = adjusted[rounded] - 0.0003
    with torch.no_grad():
        model.special_care_embeds_weights.copy_(torch.tensor(special_w, dtype=torch.float32))
        model.concept_embeds_weights.copy_(torch.tensor(concept_w, dtype=torch.float32))
    special_scores = special - special_w
    concept_scores = concept - concept_w + 0.01 * care[:, None]
    assert min(boundary_distance(special_scores), boundary_distance(concept_scores)) > MARGIN  # test precondition
    flags = (np.round(concept_scores, 3) > 0).any(1)
    assert flags[target] and not (concept[target] - concept_w > 0).any()  # flagged through the adjustment only
    assert not flags[rounded] and (concept_scores > 0).any(1)[rounded]  # unflagged through the rounding only
    return flags, target


def tiny_checker(seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=CHECKER_VISION, projection_dim=16)
    model = StableDiffusionSafetyChecker(config).eval()
    randomise(model)
    return model


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    """(folder, torch checker, images [N, 48, 64, 3], their pixel values NCHW, expected flags, the image
    flagged through the adjustment)."""
    model = tiny_checker()
    images = sample_images(N, 48, 64)
    pixel_values = clip_processor_pixels(images)
    flags, target = set_thresholds(model, pixel_values)
    assert 0 < flags.sum() < N
    path = tmp_path_factory.mktemp("safety_checker")
    model.save_pretrained(path)
    return path, model, images, pixel_values, flags, target


def diffusers_check(model, pixel_values, images):
    with torch.no_grad():
        out, flags = model(clip_input=torch.tensor(pixel_values), images=images.copy())
    return np.asarray(out), np.asarray(flags)


def test_checker_parity_with_diffusers(checker):
    path, model, images, pixel_values, flags, target = checker
    module, params = convert.load(path)
    assert isinstance(module.config, StableDiffusionSafetyCheckerConfig)
    assert module.config.vision_config == CLIPVisionConfig(**CHECKER_VISION)
    clip_input = jnp.asarray(pixel_values.transpose(0, 2, 3, 1))
    want_images, want_flags = diffusers_check(model, pixel_values, images)
    assert (want_flags == flags).all()
    got_images, got_flags = jax.jit(module.apply)({"params": params}, clip_input, jnp.asarray(images))
    assert got_flags.dtype == jnp.bool_ and (np.asarray(got_flags) == want_flags).all()
    np.testing.assert_array_equal(np.asarray(got_images), want_images)  # zeros or the untouched input
    assert (np.asarray(got_images)[want_flags] == 0).all() and (np.asarray(got_images)[~want_flags] > 0).any()
    # The tower and the embedding against torch.
    with torch.no_grad():
        tower = model.vision_model(torch.tensor(pixel_values), output_hidden_states=True)
        embeds = model.visual_projection(tower.pooler_output)
    got = module.apply({"params": params}, clip_input, output_hidden_states=True,
                       method=lambda m, x, **kw: m.vision_model(x, **kw))
    assert rel_err(got.pooler_output, tower.pooler_output) < RTOL
    assert rel_err(got.last_hidden_state, tower.last_hidden_state) < RTOL
    assert len(got.hidden_states) == len(tower.hidden_states) == 3
    for g, w in zip(got.hidden_states, tower.hidden_states):
        assert rel_err(g, w) < RTOL
    assert rel_err(module.apply({"params": params}, clip_input, method="image_embeds"), embeds) < RTOL
    # Without the special-care adjustment the target image would pass: the test exercises it.
    _, concept = module.apply({"params": params}, clip_input, method="scores")
    assert np.asarray(concept)[target].max() < 0.011 and np.asarray(concept)[target].max() > 0


def test_pipeline_path_matches_diffusers(checker, tmp_path):
    """Images in [0, 1] through load_safety_checker (preprocessing + checker) against diffusers' pipeline
    path: numpy_to_pil -> CLIPImageProcessor -> StableDiffusionSafetyChecker."""
    path, model, images, pixel_values, flags, _ = checker
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "safety_checker").symlink_to(path, target_is_directory=True)
    transformers.CLIPImageProcessor().save_pretrained(folder / "feature_extractor")
    index = {"_class_name": "StableDiffusionPipeline", "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    safety = load_safety_checker(folder)
    assert isinstance(safety, SafetyChecker) and safety.processor == ProcessorConfig()
    want_images, want_flags = diffusers_check(model, pixel_values, images)
    got_images, got_flags = safety(images)
    assert got_flags == [bool(f) for f in want_flags] and got_images.dtype == np.float32
    np.testing.assert_array_equal(got_images, want_images)
    # run_safety_checker is the same computation as a pure function.
    jitted = jax.jit(lambda p, x: run_safety_checker(safety.module, p, x))
    _, flags2 = jitted(safety.params, jnp.asarray(images))
    assert list(np.asarray(flags2)) == got_flags
    # A folder saved with safety_checker=None has no checker.
    (folder / "model_index.json").write_text(json.dumps({**index, "safety_checker": [None, None]}))
    assert load_safety_checker(folder) is None


def test_transformers4_layout_and_config(checker, tmp_path):
    """The released checkers' layout: `pytorch_model.bin` with transformers 4 names
    (`vision_model.vision_model.…`) and the position_ids buffer, and a config with transformers 4's generic keys and `vision_config_dict` overriding
    `vision_config`."""
    path, model, *_ = checker
    sd = load_file(path / "model.safetensors")
    legacy = {k.replace("vision_model.", "vision_model.vision_model.", 1) if k.startswith("vision_model.") else k: v
              for k, v in sd.items()}
    legacy["vision_model.vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    torch.save(legacy, tmp_path / "pytorch_model.bin")  # the released folders' weight file
    cfg = json.loads((path / "config.json").read_text())
    generic = {"add_cross_attention": False, "architectures": None, "bad_words_ids": None, "bos_token_id": None,
               "eos_token_id": None, "pad_token_id": None, "id2label": {"0": "LABEL_0"}, "torch_dtype": None,
               "dropout": 0, "use_bfloat16": False, "top_k": 50, "transformers_version": None}
    cfg["vision_config"] = {**cfg["vision_config"], **generic, "num_hidden_layers": 24, "patch_size": 14}
    cfg["vision_config_dict"] = {"num_hidden_layers": 2, "patch_size": 32}  # wins, as in transformers
    cfg["text_config_dict"] = {"hidden_size": 768}
    cfg.update(_commit_hash=None, _name_or_path="CompVis/stable-diffusion-safety-checker", torch_dtype="float32")
    cfg.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    module, params = convert.load(tmp_path)
    assert module.config == StableDiffusionSafetyCheckerConfig.from_diffusers(path)
    _, ref = convert.load(path)
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_export_round_trip(checker, tmp_path):
    """diffax.convert.save writes a folder diffusers' from_pretrained loads with every tensor in place."""
    path, model, images, pixel_values, _, _ = checker
    module, params = convert.load(path)
    convert.save(tmp_path, module, params)
    back, info = StableDiffusionSafetyChecker.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    want = model.state_dict()
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0)
    assert StableDiffusionSafetyCheckerConfig.from_diffusers(tmp_path) == module.config
    np.testing.assert_array_equal(diffusers_check(back, pixel_values, images)[1],
                                  diffusers_check(model, pixel_values, images)[1])


@pytest.mark.parametrize("class_name,act,prefixed", [("CLIPVisionModel", "quick_gelu", False),
                                                     ("CLIPVisionModel", "quick_gelu", True),
                                                     ("CLIPVisionModelWithProjection", "gelu", True)])
def test_clip_vision_parity_and_export(class_name, act, prefixed, tmp_path):
    """transformers 5 saves a bare CLIPVisionModel unprefixed (`embeddings.…`); transformers 4 files (and
    every WithProjection file) have `vision_model.`: both load; export writes the prefixed form."""
    torch.manual_seed(1)
    config = transformers.CLIPVisionConfig(**TOWER, image_size=32, patch_size=8, hidden_act=act)
    model = getattr(transformers, class_name)(config).eval()
    randomise(model)
    model.save_pretrained(tmp_path / "torch")
    weights = tmp_path / "torch" / "model.safetensors"
    sd = load_file(weights)
    assert any(k.startswith("vision_model.") for k in sd) == (class_name != "CLIPVisionModel")
    if prefixed and class_name == "CLIPVisionModel":
        save_file({"vision_model." + k: v for k, v in sd.items()}, weights, metadata={"format": "pt"})
    module, params = convert.load(tmp_path / "torch")
    want_cls = CLIPVisionWithProjectionConfig if class_name.endswith("Projection") else CLIPVisionConfig
    assert type(module.config) is want_cls and isinstance(module, CLIPVisionModel)
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.tensor(x), output_hidden_states=True)
    got = jax.jit(lambda p, v: module.apply({"params": p}, v, output_hidden_states=True))(
        params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert got.last_hidden_state.shape == (3, 1 + 16, 32)
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < RTOL
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        assert rel_err(g, w) < RTOL
    if class_name == "CLIPVisionModel":
        assert got.image_embeds is None and rel_err(got.pooler_output, want.pooler_output) < RTOL
    else:
        assert rel_err(got.image_embeds, want.image_embeds) < RTOL
    convert.save(tmp_path / "export", module, params)
    assert all(k.startswith(("vision_model.", "visual_projection.")) for k in load_file(tmp_path / "export" / "model.safetensors"))
    back, info = getattr(transformers, class_name).from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want_sd = model.state_dict()
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, want_sd[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pixel_values must be"):
        module.apply({"params": params}, jnp.zeros((1, 16, 16, 3)))


def test_clip_vision_bf16_stays_close_to_torch_fp32(tmp_path):
    """bf16 weights and compute (LayerNorms and softmax stay fp32): within 5e-2 of the output scale, as the
    text encoders (8 mantissa bits, ~4e-3 per rounding, over the layers); a norm run in bf16 would not be."""
    torch.manual_seed(4)
    model = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**TOWER, image_size=32, patch_size=8, hidden_act="gelu")).eval()
    randomise(model)
    model.save_pretrained(tmp_path)
    module, params = convert.load(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.tensor(x))
    got = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert got.image_embeds.dtype == jnp.bfloat16
    assert rel_err(got.image_embeds, want.image_embeds) < 5e-2
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < 5e-2


@pytest.mark.parametrize("shape", [(2, 32, 32), (1, 48, 80), (1, 96, 64), (1, 512, 512), (1, 224, 224)])
def test_preprocess_matches_clip_image_processor(shape):
    """Bit-exact (tolerance 0) against CLIPImageProcessor's PIL backend after numpy_to_pil: up- and
    down-sampling, landscape and portrait, and an image already 224 x 224."""
    images = sample_images(shape[0], *shape[1:], seed=sum(shape))
    want = clip_processor_pixels(images).transpose(0, 2, 3, 1)
    got = jax.jit(preprocess_for_safety_checker)(jnp.asarray(images))
    assert got.shape == want.shape == (shape[0], 224, 224, 3) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_processor_config_from_folder(tmp_path):
    """A feature extractor with other sizes and statistics is read from its folder and followed exactly."""
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 96}, crop_size={"height": 64, "width": 80},
                                                image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    processor.save_pretrained(tmp_path)
    config = read_processor_config(tmp_path)
    assert config == ProcessorConfig(96, (64, 80), 1 / 255, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    images = sample_images(2, 40, 72, seed=3)
    want = processor(VaeImageProcessor.numpy_to_pil(images), return_tensors="np")["pixel_values"]
    got = preprocess_for_safety_checker(jnp.asarray(images), config)
    np.testing.assert_array_equal(np.asarray(got), want.transpose(0, 2, 3, 1))
    assert read_processor_config(tmp_path / "missing") == ProcessorConfig()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    with pytest.raises(ValueError, match="preprocessor_config.json: resample=2"):
        read_processor_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.2, 0, 0.3]}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: image_std=\[0.2, 0, 0.3\] is not supported"):
        read_processor_config(tmp_path)


def test_config_errors_name_the_file_and_key(checker, tmp_path):
    path, *_ = checker
    cfg = json.loads((path / "config.json").read_text())
    bad = {**cfg, "vision_config": {**cfg["vision_config"], "num_attention_heads": 5}}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"config.json: vision_config: hidden_size=32 .*num_attention_heads=5"):
        StableDiffusionSafetyCheckerConfig.from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "siglip"}))
    with pytest.raises(ValueError, match="config.json: model_type is 'siglip'"):
        StableDiffusionSafetyCheckerConfig.from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vision_config": {**cfg["vision_config"], "mystery": 1}}))
    with pytest.raises(ValueError, match=r"vision_config: unknown CLIPVisionModel config key\(s\) \['mystery'\]"):
        StableDiffusionSafetyCheckerConfig.from_diffusers(tmp_path)


def test_stable_diffusion_pipeline_with_checker(tmp_path):
    """A tiny StableDiffusionPipeline folder with a safety checker: diffax.pipelines.load runs it on the
    decoded images, flags and blacks out what diffusers' pipeline does (images within the pipelines' 1e-3),
    and safety_checker=False turns it off."""
    import shutil

    import diffax.pipelines
    from tests.pipeline_fixtures import build_sd_pipeline, diffusers_images

    plain_folder = build_sd_pipeline(tmp_path / "sd")
    latents = np.random.default_rng(0).standard_normal((N, 8, 8, 4)).astype(np.float32)
    call = dict(prompt=["a cat", "a dog"] * (N // 2), num_inference_steps=2, guidance_scale=5.0)
    plain = diffusers_images(plain_folder, latents=latents, **call)
    model = tiny_checker(seed=3)
    flags, _ = set_thresholds(model, clip_processor_pixels(plain))
    folder = tmp_path / "sd_checked"
    shutil.copytree(plain_folder, folder)
    model.save_pretrained(folder / "safety_checker")
    transformers.CLIPImageProcessor().save_pretrained(folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    want = diffusers_images(folder, latents=latents, **call)
    assert (want[flags] == 0).all() and (want[~flags] == plain[~flags]).all()

    pipe = diffax.pipelines.load(folder, cache_dir=tmp_path / "cache")
    assert isinstance(pipe.safety_checker, SafetyChecker) and "safety_checker" not in pipe.components
    out = pipe(latents=latents, **call)
    assert out.nsfw_content_detected == [bool(f) for f in flags]
    assert (out.images[flags] == 0).all()
    np.testing.assert_allclose(out.images, want, rtol=0, atol=1e-3)
    unchecked = diffax.pipelines.load(folder, cache_dir=tmp_path / "cache", safety_checker=False)
    out = unchecked(latents=latents, **call)
    assert out.nsfw_content_detected is None
    np.testing.assert_allclose(out.images, plain, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_full_size_checker(tmp_path):
    """The released checker's size (CLIP ViT-L/14 image tower, 304M parameters; `make test-slow`), default
    random init with every 1-D tensor and the concept embeddings randomised: two 512 x 512 images through
    diffusers' pipeline path and through SafetyChecker, one flagged."""
    torch.manual_seed(0)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, image_size=224, projection_dim=768)
    model = StableDiffusionSafetyChecker(transformers.CLIPConfig(vision_config=vision, projection_dim=768)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "embeds" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
    images = sample_images(2, 512, 512, seed=5)
    pixel_values = clip_processor_pixels(images)
    with torch.no_grad():
        tower = model.vision_model(torch.tensor(pixel_values))
        embeds = model.visual_projection(tower.pooler_output)
        concept = cosine_distance(embeds, model.concept_embeds).numpy().astype(np.float64)
        special = cosine_distance(embeds, model.special_care_embeds).numpy().astype(np.float64)
        weights = concept.max(0) + 0.1
        weights[0] = concept[0, 0] - 0.02  # image 0 flagged by concept 0
        model.concept_embeds_weights.copy_(torch.tensor(weights, dtype=torch.float32))
        model.special_care_embeds_weights.copy_(torch.tensor(special.max(0) + 0.1, dtype=torch.float32))
    assert boundary_distance(concept - weights) > MARGIN  # test precondition
    want_images, want_flags = diffusers_check(model, pixel_values, images)
    model.save_pretrained(tmp_path / "safety_checker")
    del model
    (tmp_path / "model_index.json").write_text(json.dumps({"safety_checker": ["stable_diffusion", "x"]}))
    safety = load_safety_checker(tmp_path)
    got_images, got_flags = safety(images)
    assert got_flags == [bool(f) for f in want_flags] and want_flags[0]
    np.testing.assert_array_equal(got_images, want_images)
    clip_input = jnp.asarray(pixel_values.transpose(0, 2, 3, 1))
    got = safety.module.apply({"params": safety.params}, clip_input,
                              method=lambda m, x: m.vision_model(x))
    errors = {"last_hidden_state": rel_err(got.last_hidden_state, tower.last_hidden_state),
              "pooler_output": rel_err(got.pooler_output, tower.pooler_output),
              "image_embeds": rel_err(safety.module.apply({"params": safety.params}, clip_input,
                                                          method="image_embeds"), embeds)}
    print("full-size safety checker, relative error:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < RTOL
