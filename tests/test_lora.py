"""LoRA loading (diffax.convert.lora) and adapters on a pipeline (diffax.pipelines.lora) against diffusers.

A tiny random-weight diffusers UNet2DConditionModel (SD 1.x shape: 1x1-conv proj_in / proj_out) and CLIP
text encoder are saved and loaded into diffax. Two LoRA files cover every linear and conv layer of both
(3x3 convs included) with random down and up factors (up nonzero) and alpha != rank:
  peft    written by diffusers' `save_lora_weights` (lora_A / lora_B keys), alphas and a mixed rank in the
          `lora_adapter_metadata` header (lora_alpha, alpha_pattern, rank_pattern);
  kohya   `lora_unet_*` / `lora_te_*` keys with lora_down / lora_up / alpha, per-module alphas.
Both are loaded into a diffusers StableDiffusionPipeline (peft backend) and into diffax; the U-Net and text
encoder outputs agree at fp32 (max|diffax - torch| / max|torch| < 1e-4, as the model parity tests; a wrong
alpha, transpose or layout moves them by O(1e-1)) for one adapter, another weight, two adapters at once,
and fused.
"""
from __future__ import annotations

import copy
import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffax import convert  # noqa: E402
from diffax.convert.io import CheckpointError, read_state_dict, write_safetensors  # noqa: E402
from diffax.convert.lora import read_lora  # noqa: E402
from diffax.convert.rules import flatten, key_to_path  # noqa: E402
import diffax.pipelines.lora as lora  # noqa: E402
from diffax.pipelines.lora import LoraMixin  # noqa: E402

RTOL = 1e-4
SIDE, TOKENS, LENGTH, VOCAB = 16, 5, 16, 64
UNET = dict(sample_size=SIDE, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4)
CLIP = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=LENGTH, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=63, pad_token_id=63)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomise(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def lora_modules(model) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d of a torch model by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def factors(module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) in torch layouts; up is nonzero, scaled so the update is a sizeable fraction of W."""
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen)
        up = torch.randn(module.out_channels, rank, 1, 1, generator=gen)
    else:
        down = torch.randn(rank, module.in_features, generator=gen)
        up = torch.randn(module.out_features, rank, generator=gen)
    fan_in = down[0].numel()
    return down * fan_in ** -0.5 * 0.3, up * rank ** -0.5 * 0.3


def write_peft(path, unet, te) -> None:
    """A diffusers-format file through diffusers' own writer, with a LoraConfig per component in its header:
    rank 4 and alpha 8, one module at rank 2 (rank_pattern) and two at other alphas (alpha_pattern)."""
    gen = torch.Generator().manual_seed(1)
    layers, metadata = {}, {}
    for name, model, odd in (("unet", unet, "down_blocks.0.attentions.0.proj_in"),
                             ("text_encoder", te, "encoder.layers.1.mlp.fc2")):
        modules = lora_modules(model)
        sd = {}
        for module_name, module in modules.items():
            down, up = factors(module, 2 if module_name == odd else 4, gen)
            sd[f"{module_name}.lora_A.weight"], sd[f"{module_name}.lora_B.weight"] = down, up
        layers[name] = sd
        first = sorted(modules)[0]
        metadata[name] = dict(r=4, lora_alpha=8, rank_pattern={odd: 2}, alpha_pattern={odd: 3, first: 1.5},
                              target_modules=sorted(modules))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=metadata["unet"], text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        weight_name="peft.safetensors")


def write_kohya(path, unet, te) -> dict[str, np.ndarray]:
    """A kohya-format file: alpha 2 at rank 4, alpha 3 on proj_in and the resnets' conv1. (diffusers maps
    per-module kohya alphas by pattern and gets only some modules right, e.g. not attention projections,
    so the other modules share one alpha.)"""
    gen = torch.Generator().manual_seed(2)
    sd = {}
    for prefix, model in (("lora_unet", unet), ("lora_te", te)):
        for module_name, module in lora_modules(model).items():
            if prefix == "lora_te":
                module_name = "text_model." + module_name  # kohya's names carry transformers 4's prefix
            key = f"{prefix}_{module_name.replace('.', '_')}"
            down, up = factors(module, 4, gen)
            alpha = 3.0 if module_name.endswith(("proj_in", "conv1")) else 2.0
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down.numpy(), up.numpy()
            sd[f"{key}.alpha"] = np.array(alpha, np.float32)
    write_safetensors(path, sd)
    return sd


class Pipe(LoraMixin):
    """The least a pipeline holds for LoraMixin: `components`, and a `_params_changed` hook."""

    def __init__(self, components):
        self.components = dict(components)
        self.changes = 0

    def _params_changed(self):
        self.changes += 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(diffusers pipeline, diffax Pipe, LoRA folder, inputs), both pipelines holding adapters 'peft' and
    'kohya'."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET).eval()
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)).eval()
    randomise(unet)
    randomise(te)
    unet.save_pretrained(root / "unet")
    te.save_pretrained(root / "text_encoder")
    write_peft(root, unet, te)
    write_kohya(root / "kohya.safetensors", unet, te)

    pipe = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=copy.deepcopy(te), tokenizer=None, unet=copy.deepcopy(unet),
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.load_lora_weights(str(root), weight_name="peft.safetensors", adapter_name="peft")
    pipe.load_lora_weights(str(root / "kohya.safetensors"), adapter_name="kohya")

    ours = Pipe({"unet": convert.load(root / "unet"), "text_encoder": convert.load(root / "text_encoder")})
    base = {name: params for name, (_, params) in ours.components.items()}
    ours.load_lora_weights(root / "peft.safetensors", adapter_name="peft")
    ours.load_lora_weights(root / "kohya.safetensors", adapter_name="kohya")

    rng = np.random.default_rng(3)
    inputs = dict(x=rng.standard_normal((2, SIDE, SIDE, 4)).astype(np.float32), t=np.array([3.0, 700.0], np.float32),
                  ctx=rng.standard_normal((2, TOKENS, 32)).astype(np.float32),
                  ids=rng.integers(0, VOCAB, (2, LENGTH)).astype(np.int64))
    return pipe, ours, root, inputs, base, (unet, te)


def torch_outputs(pipe, inp) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        x = torch.from_numpy(inp["x"]).permute(0, 3, 1, 2)
        u = pipe.unet(x, torch.from_numpy(inp["t"]), torch.from_numpy(inp["ctx"])).sample.permute(0, 2, 3, 1)
        h = pipe.text_encoder(torch.from_numpy(inp["ids"])).last_hidden_state
    return u.numpy(), h.numpy()


@functools.cache
def _forward(unet_module, te_module):
    unet_fn = jax.jit(lambda p, x, t, c: unet_module.apply({"params": p}, x, t, encoder_hidden_states=c))
    te_fn = jax.jit(lambda p, ids: te_module.apply({"params": p}, ids).last_hidden_state)
    return unet_fn, te_fn


def diffax_outputs(ours, inp) -> tuple[np.ndarray, np.ndarray]:
    (unet_module, unet_params), (te_module, te_params) = ours.components["unet"], ours.components["text_encoder"]
    unet_fn, te_fn = _forward(unet_module, te_module)
    return (np.asarray(unet_fn(unet_params, inp["x"], inp["t"], inp["ctx"])),
            np.asarray(te_fn(te_params, inp["ids"].astype(np.int32))))


def assert_parity(pipe, ours, inp, base=None) -> None:
    (tu, th), (du, dh) = torch_outputs(pipe, inp), diffax_outputs(ours, inp)
    assert rel_err(du, tu) < RTOL and rel_err(dh, th) < RTOL, (rel_err(du, tu), rel_err(dh, th))
    if base is not None:  # the LoRA moves the outputs far beyond the tolerance
        assert rel_err(du, base[0]) > 100 * RTOL and rel_err(dh, base[1]) > 100 * RTOL


@pytest.mark.parametrize("names, weights", [(["kohya"], [1.0]), (["peft"], [1.0]), (["peft"], [0.5]),
                                            (["peft", "kohya"], [0.7, 0.4])])
def test_parity_with_diffusers(setup, names, weights):
    pipe, ours, _, inp, _, _ = setup
    pipe.set_adapters(names, weights)
    ours.set_adapters(names, weights)
    pipe.disable_lora()
    base = torch_outputs(pipe, inp)
    pipe.enable_lora()
    assert_parity(pipe, ours, inp, base)


def test_load_activates_only_the_new_adapter(setup):
    pipe, ours, _, _, _, _ = setup
    assert ours.get_list_adapters() == {"unet": ["peft", "kohya"], "text_encoder": ["peft", "kohya"]}
    ours.set_adapters("kohya")
    assert ours.get_active_adapters() == ["kohya"]
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        ours.set_adapters(["nope"])


def test_new_weight_does_not_retrace(setup):
    _, ours, _, _, _, _ = setup
    ours.set_adapters(["peft", "kohya"], [0.1, 0.2])
    traces = lora._merge._cache_size()
    changes = ours.changes
    for w in (0.3, -1.0, 2.5):
        ours.set_adapters(["peft", "kohya"], [w, 0.2])
    assert lora._merge._cache_size() == traces
    assert ours.changes == changes + 3  # the pipeline was told each time


def test_fuse_unfuse(setup):
    pipe, ours, _, inp, _, _ = setup
    pipe.set_adapters(["peft", "kohya"], [0.7, 0.4])
    ours.set_adapters(["peft", "kohya"], [0.7, 0.4])
    unfused = {c: flatten(p) for c, (_, p) in ours.components.items()}
    ours.fuse_lora(lora_scale=0.5)
    pipe.fuse_lora(lora_scale=0.5)
    try:
        assert ours.get_active_adapters() == []
        assert_parity(pipe, ours, inp)
        with pytest.raises(ValueError, match="fused"):
            ours.set_adapters(["peft"])
    finally:
        pipe.unfuse_lora()
    ours.unfuse_lora()
    assert ours.get_active_adapters() == ["peft", "kohya"]
    for c, (_, p) in ours.components.items():
        for path, value in flatten(p).items():
            np.testing.assert_allclose(value, unfused[c][path], rtol=0, atol=1e-6, err_msg="/".join(path))
    # Fused at scale 1 are the very weights applied on the fly.
    ours.fuse_lora()
    fused = {c: flatten(p) for c, (_, p) in ours.components.items()}
    ours.unfuse_lora()
    for c in fused:
        for path, value in fused[c].items():
            np.testing.assert_array_equal(value, unfused[c][path])


def test_unload_restores_the_original_params(setup, tmp_path):
    _, ours, root, inp, base, (unet, te) = setup
    pipe = Pipe({c: (module, base[c]) for c, (module, _) in ours.components.items()})
    pipe.load_lora_weights(root / "kohya.safetensors")
    assert pipe.get_active_adapters() == ["default_0"]
    pipe.unload_lora_weights()
    for c, (_, params) in pipe.components.items():
        assert params is base[c]
    assert pipe.get_list_adapters() == {}
    # Unloading while fused keeps the fused weights, as diffusers does.
    pipe.load_lora_weights(root / "kohya.safetensors", scale=0.5)
    pipe.disable_lora()
    for c, (_, params) in pipe.components.items():
        assert all(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base[c])))
    pipe.enable_lora()
    on_the_fly = diffax_outputs(pipe, inp)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for a, b in zip(diffax_outputs(pipe, inp), on_the_fly):
        assert rel_err(a, b) < 1e-6


def test_ldm_names_equal_diffusers_names(setup, tmp_path):
    """kohya's SDXL-style files name U-Net modules after the original LDM code: the same weights under those
    names load to the same layers (the LDM names here written by hand from the LDM layout)."""
    _, ours, root, _, _, _ = setup
    ldm = {"input_blocks_0_0": "conv_in", "input_blocks_1_1_proj_in": "down_blocks_0_attentions_0_proj_in",
           "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
           "input_blocks_1_0_emb_layers_1": "down_blocks_0_resnets_0_time_emb_proj",
           "input_blocks_2_0_op": "down_blocks_0_downsamplers_0_conv",
           "input_blocks_3_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
           "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
           "middle_block_2_out_layers_3": "mid_block_resnets_1_conv2",
           "output_blocks_1_1_conv": "up_blocks_0_upsamplers_0_conv",
           "output_blocks_2_1_proj_out": "up_blocks_1_attentions_0_proj_out",
           "output_blocks_3_1_transformer_blocks_0_ff_net_2": "up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2",
           "time_embed_0": "time_embedding_linear_1", "out_2": "conv_out"}
    sd = read_state_dict(root / "kohya.safetensors")
    diffusers_names, ldm_names = {}, {}
    for ldm_name, name in ldm.items():
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            diffusers_names[f"lora_unet_{name}.{part}"] = sd[f"lora_unet_{name}.{part}"]
            ldm_names[f"lora_unet_{ldm_name}.{part}"] = sd[f"lora_unet_{name}.{part}"]
    write_safetensors(tmp_path / "a.safetensors", diffusers_names)
    write_safetensors(tmp_path / "b.safetensors", ldm_names)
    a = read_lora(tmp_path / "a.safetensors", ours.components)["unet"]
    b = read_lora(tmp_path / "b.safetensors", ours.components)["unet"]
    assert sorted(a) == sorted(b) and len(a) == len(ldm)
    for path in a:
        for x, y in zip(a[path], b[path]):
            np.testing.assert_array_equal(x, y)


def test_layouts(setup, tmp_path):
    """The stored factors are in the kernels' layouts: linear [I, r] @ [r, O], 3x3 conv [3, 3, I, r] @ [r, O],
    and `scale` is alpha / rank."""
    _, ours, root, _, _, (unet, _) = setup
    layers = read_lora(root / "kohya.safetensors", ours.components)
    conv = layers["unet"]["down_blocks_0/resnets_0/conv1/kernel"]
    assert conv.down.shape == (3, 3, 16, 4) and conv.up.shape == (4, 16) and conv.scale == 3.0 / 4
    q = layers["text_encoder"]["text_model/encoder/layers_0/self_attn/q_proj/kernel"]
    assert q.down.shape == (32, 4) and q.up.shape == (4, 32) and q.scale == 2.0 / 4
    # A linear layer's LoRA ([r, I], [O, r]) on a 1x1 conv, as SD 2.x LoRAs meet SD 1.x proj_in, and back.
    proj_in = layers["unet"]["down_blocks_0/attentions_0/proj_in/kernel"]
    assert proj_in.down.shape == (1, 1, 16, 4)
    sd = read_state_dict(root / "kohya.safetensors")
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    linear = {f"{key}.lora_down.weight": sd[f"{key}.lora_down.weight"][:, :, 0, 0],
              f"{key}.lora_up.weight": sd[f"{key}.lora_up.weight"][:, :, 0, 0], f"{key}.alpha": sd[f"{key}.alpha"]}
    write_safetensors(tmp_path / "linear.safetensors", linear)
    again = read_lora(tmp_path / "linear.safetensors", ours.components)["unet"]
    again = again["down_blocks_0/attentions_0/proj_in/kernel"]
    for x, y in zip(again, proj_in):
        np.testing.assert_array_equal(x, y)


def test_errors(setup, tmp_path):
    _, ours, root, _, _, _ = setup
    down, up = np.ones((4, 16), np.float32), np.ones((16, 4), np.float32)
    cases = {
        "nowhere": ({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": down,
                     "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": up}, "down_blocks_9.*maps to no"),
        "te2": ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down},
                "text_encoder_2, which this pipeline has not"),
        "peft_nowhere": ({"unet.mid_block.attentions.0.proj_up.lora_A.weight": down}, "proj_up.*maps to no"),
        "shape": ({"unet.conv_in.lora_A.weight": down, "unet.conv_in.lora_B.weight": up}, "do not fit"),
        "unpaired": ({"unet.time_embedding.linear_1.lora_A.weight": np.ones((4, 16), np.float32)},
                     "no matching up"),
        "dora": ({"lora_unet_conv_in.dora_scale": up}, "DoRA"),
        "junk": ({"unet.conv_in.weight": up}, "is no LoRA entry"),
    }
    for name, (sd, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(path, sd)
        with pytest.raises(CheckpointError, match=message) as info:
            read_lora(path, ours.components)
        assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match="no such LoRA file"):
        read_lora(tmp_path / "missing.safetensors", ours.components)


def test_stable_diffusion_pipeline_with_lora_matches_diffusers(tmp_path):
    """LoraMixin on the Stable Diffusion pipeline class: images with a kohya LoRA at weight 0.8 match
    diffusers' (max abs 1e-3 on [0, 1] images, as the pipeline tests), a new weight runs the same compiled
    program, and unloading gives the images without LoRA back."""
    import diffax.pipelines
    from diffax.pipelines.stable_diffusion import StableDiffusionPipeline
    from tests.pipeline_fixtures import build_sd_pipeline

    folder = build_sd_pipeline(tmp_path / "sd")
    ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    write_kohya(tmp_path / "kohya.safetensors", ref.unet, ref.text_encoder)
    loaded = diffax.pipelines.load(folder, cache_dir=tmp_path / "cache")
    pipe = StableDiffusionPipeline(loaded.components, loaded.scheduler, tokenizers=loaded.tokenizers)
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=2, guidance_scale=5.0)
    plain = pipe(latents=latents, **kw).images

    pipe.load_lora_weights(tmp_path / "kohya.safetensors", scale=0.8)
    traces = pipe.trace_count
    got = pipe(latents=latents, **kw).images
    assert pipe.trace_count == traces  # new params, the same program
    ref.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    ref.set_adapters(["default_0"], [0.8])
    with torch.no_grad():
        want = ref(latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np", **kw).images
    assert want.std() > 0.05
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    assert np.abs(got - plain).max() > 1e-2

    pipe.unload_lora_weights()
    np.testing.assert_array_equal(pipe(latents=latents, **kw).images, plain)


SDXL_UNET = dict(sample_size=SIDE, block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=40, attention_head_dim=(2, 4),
                 transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)


def test_sdxl_kohya_ldm_names_map_as_diffusers_maps_them(tmp_path):
    """An SDXL kohya file (U-Net under its LDM names, `lora_te1_` / `lora_te2_` text encoders) loaded into
    diffusers' StableDiffusionXLPipeline and into diffax puts the same factors and scale on every module.
    (The LDM names are diffax's own table's; diffusers maps them with its own code.)"""
    from diffax.convert.lora import kohya_names
    from diffax.models import abstract_params, get_family, make_module

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SDXL_UNET).eval()
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)).eval()
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **{**CLIP, "hidden_size": 24, "projection_dim": 16, "hidden_act": "gelu"})).eval()
    targets = {}
    for component, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        fields = dict(model.config) if component == "unet" else model.config.to_dict()
        config = get_family(type(model).__name__).config_cls.from_diffusers(fields)
        targets[component] = (make_module(config), abstract_params(config))
    gen, sd = np.random.default_rng(0), {}

    def add(key, kernel_shape, alpha):
        down = gen.standard_normal((4, *kernel_shape[:-1])).astype(np.float32)  # [r, (kh, kw,) I]
        if down.ndim == 4:
            down = down.transpose(0, 3, 1, 2)  # [r, I, kh, kw]
        up = gen.standard_normal((kernel_shape[-1], 4, *([1, 1] if down.ndim == 4 else []))).astype(np.float32)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = np.array(alpha, np.float32)

    flat = flatten(targets["unet"][1])
    ldm = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
    unet_names = {n: p for n, p in kohya_names(*targets["unet"]).items() if n.startswith(ldm)}
    assert len(set(unet_names.values())) == len({p[:-1] for p in flat if p[-1] == "kernel"})  # every layer
    for name, path in unet_names.items():
        add(f"lora_unet_{name}", flat[(*path, "kernel")].shape, 2.0)
    for prefix, component in (("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")):
        te_flat = flatten(targets[component][1])
        for path in te_flat:
            if path[-1] == "kernel" and path[0] == "text_model":
                add(f"{prefix}_{'_'.join(path[:-1])}", te_flat[path].shape, 2.0)
    write_safetensors(tmp_path / "sdxl.safetensors", sd)

    ours = read_lora(tmp_path / "sdxl.safetensors", targets)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler())
    pipe.load_lora_weights(str(tmp_path / "sdxl.safetensors"), adapter_name="x")
    for component, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        theirs = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "x" in m.lora_A}
        assert len(theirs) == len(ours[component]), component
        for name, m in theirs.items():
            path = key_to_path(name)  # transformers 5's CLIPTextModel has no `text_model.`, with projection has
            path = "/".join((*("text_model",) * (component != "unet" and path[0] != "text_model"), *path, "kernel"))
            layer = ours[component][path]
            down = m.lora_A["x"].weight.detach().numpy()
            down = down.transpose(2, 3, 1, 0) if down.ndim == 4 else down.T
            np.testing.assert_array_equal(layer.down, down, err_msg=path)
            np.testing.assert_array_equal(layer.up, m.lora_B["x"].weight.detach().numpy().reshape(-1, 4).T)
            assert layer.scale == m.scaling["x"] == 0.5


def test_with_lora_on_params_sharded_over_a_mesh(tmp_path, num_devices):
    """GenerationPipeline.with_lora on a tiny DiT's params placed over a data x fsdp mesh of 8 (fake CPU)
    devices: each merged kernel keeps its base's sharding and equals the host merge; a tree whose kernels
    sit on different device sets (one on a single device: one jitted merge cannot take both) and traced
    params (inside jit) merge too."""
    if num_devices < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    from jax.sharding import SingleDeviceSharding

    from diffax import parallel
    from diffax.convert.rules import unflatten
    from diffax.models import DiTConfig, abstract_params, logical_specs, make_module
    from diffax.pipelines.generation import GenerationPipeline
    from diffax.schedulers.names import scheduler_for
    from diffax.train import finetune

    config = DiTConfig.from_reference(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1,
                                      num_heads=4, num_classes=10)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), abstract_params(config))
    lora_params = finetune.init_lora(params, finetune.lora_targets(params, "attention"), 2, jax.random.key(0))
    lora_params = jax.tree.map(lambda x: np.asarray(x) + 0.1, lora_params)  # up nonzero
    path = finetune.export_lora(tmp_path / "lora.safetensors", lora_params, alpha=2.0)
    want = flatten(finetune.merge_lora(params, lora_params, scale=1.0))
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    pipe = GenerationPipeline(make_module(config), scheduler_for("ddim", {}), mesh)
    shardings = parallel.logical_shardings(logical_specs(config), pipe.mesh, pipe.rules, shapes=params)
    placed = jax.device_put(params, shardings)
    merged = flatten(pipe.with_lora(placed, path))
    base, spec = flatten(placed), flatten(shardings)
    targets = {p for p in flatten(lora_params) if p[-1] == "lora_down"}
    assert targets and any(len(spec[p[:-1] + ("kernel",)].device_set) == 8 and
                           any(spec[p[:-1] + ("kernel",)].spec) for p in targets)  # some are split over fsdp
    for key, value in merged.items():
        assert value.sharding.is_equivalent_to(base[key].sharding, value.ndim), key  # (size-1 axes may drop)
        np.testing.assert_allclose(np.asarray(value), want[key], rtol=1e-5, atol=1e-6, err_msg=str(key))
        if key[:-1] + ("lora_down",) not in targets:
            assert value is base[key]  # untouched leaves are the very arrays
    # Kernels on two device sets: the mesh's eight devices and device 3 alone.
    kernel = sorted(targets)[0][:-1] + ("kernel",)
    mixed = {**base, kernel: jax.device_put(flatten(params)[kernel], jax.devices()[3])}
    out = flatten(pipe.with_lora(unflatten(mixed), path))
    assert out[kernel].sharding == SingleDeviceSharding(jax.devices()[3])
    np.testing.assert_allclose(np.asarray(out[kernel]), want[kernel], rtol=1e-5, atol=1e-6)
    # Traced params: the merge is part of the surrounding program.
    traced = flatten(jax.jit(lambda p: pipe.with_lora(p, path))(placed))
    np.testing.assert_allclose(np.asarray(traced[kernel]), want[kernel], rtol=1e-5, atol=1e-6)
