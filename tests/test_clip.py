"""Tests for the CLIP text encoders (diffax.models.clip) and their conversion (diffax.convert.clip).

Parity is against transformers' CLIPTextModel / CLIPTextModelWithProjection built from tiny configs in the
shape of Stable Diffusion's three encoders, with every tensor randomised (LayerNorms included), saved with
`save_pretrained` and read back through `diffax.convert.load`.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from diffax import convert
from diffax.convert.io import read_state_dict, write_safetensors
from diffax.convert.rules import flatten
from diffax.models import abstract_params, build_model, get_family, logical_specs
from diffax.models.attention import dot_product_attention
from diffax.models.clip import (CLIPTextConfig, CLIPTextModel, CLIPTextWithProjectionConfig, load_tokenizer,
                                tokenize)

# fp32 relative error budget (max-abs diff / max-abs output), DESIGN.md's parity bar.
RTOL = 1e-4
VOCAB, LENGTH, EOS, BOS = 64, 16, 63, 62
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, projection_dim=24, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=LENGTH, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
# name -> (transformers class, config overrides, padding id): SD 1.x pads with the end-of-text token, SD 2.x
# and SDXL's second encoder with '!' (id 0). 'sd2' is in the old-config style of the released SD 2 files,
# eos_token_id 2: pooling then takes the highest token id.
VARIANTS = {
    "sd1": ("CLIPTextModel", dict(hidden_act="quick_gelu"), EOS),
    "sd2_legacy_eos": ("CLIPTextModel", dict(hidden_act="gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1), 0),
    "sdxl_projection": ("CLIPTextModelWithProjection", dict(hidden_act="gelu"), 0),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def token_ids(pad):
    """[4, LENGTH] prompts with the end-of-text token at different places (the last one truncated, its EOS in
    the last slot), the rest padded with `pad`; and their attention mask."""
    rng = np.random.default_rng(1)
    ids = np.full((4, LENGTH), pad, np.int64)
    mask = np.zeros((4, LENGTH), np.int64)
    for row, n in enumerate((3, 7, 11, LENGTH - 2)):
        ids[row, 0] = BOS
        ids[row, 1:n + 1] = rng.integers(1, BOS, n)
        ids[row, n + 1] = EOS
        mask[row, :n + 2] = 1
    return ids, mask


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def folder(request, tmp_path_factory):
    """(variant, transformers folder, torch model) with random weights."""
    class_name, overrides, pad = VARIANTS[request.param]
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**{**TINY, **overrides})
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # LayerNorms start at 1 / 0: randomise every tensor
            scale = 0.5 if p.ndim == 1 else p.shape[-1] ** -0.5
            offset = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
            p.copy_(torch.randn_like(p) * scale + offset)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, model


def torch_outputs(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                     output_hidden_states=True)


def assert_parity(module, params, model, pad):
    ids, mask = token_ids(pad)
    for m in (mask, None):  # with the padding mask, and without it (diffusers' SD pipelines pass none)
        want = torch_outputs(model, ids, m)
        got = jax.jit(lambda p, i, a: module.apply({"params": p}, i, attention_mask=a, output_hidden_states=True))(
            params, jnp.asarray(ids, jnp.int32), None if m is None else jnp.asarray(m))
        assert rel_err(got.last_hidden_state, want.last_hidden_state) < RTOL
        assert len(got.hidden_states) == len(want.hidden_states) == module.config.num_hidden_layers + 1
        for g, w in zip(got.hidden_states, want.hidden_states):
            assert rel_err(g, w) < RTOL
        if module.config.with_projection:
            assert got.pooler_output.shape == (4, module.config.hidden_size)
            assert rel_err(got.text_embeds, want.text_embeds) < RTOL
            pooled = want.last_hidden_state[np.arange(4), (ids == EOS).argmax(-1)]  # WithProjection has no pooler
            assert rel_err(got.pooler_output, pooled) < RTOL
        else:
            assert got.text_embeds is None
            assert rel_err(got.pooler_output, want.pooler_output) < RTOL


def test_parity_with_transformers(folder):
    variant, path, model = folder
    module, params = convert.load(path)
    want_cls = CLIPTextWithProjectionConfig if variant == "sdxl_projection" else CLIPTextConfig
    assert type(module.config) is want_cls and isinstance(module, CLIPTextModel)
    assert_parity(module, params, model, VARIANTS[variant][2])
    # Without output_hidden_states none are returned; the outputs do not change.
    ids, _ = token_ids(VARIANTS[variant][2])
    plain = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert plain.hidden_states is None and plain.last_hidden_state.shape == (4, LENGTH, 32)



def test_bf16_stays_close_to_torch_fp32(folder):
    """bf16 weights and compute (LayerNorms and softmax stay fp32): 8 mantissa bits, ~4e-3 per rounding,
    accumulated over the layers; 5e-2 of the output scale catches a norm or softmax run in bf16."""
    variant, path, model = folder
    module, params = convert.load(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids, mask = token_ids(VARIANTS[variant][2])
    want = torch_outputs(model, ids, mask)
    got = module.apply({"params": params}, jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask))
    assert got.last_hidden_state.dtype == jnp.bfloat16
    err = rel_err(np.asarray(got.last_hidden_state, np.float32), want.last_hidden_state)
    print(f"CLIP {variant} bf16 vs torch fp32: {err:.2e}")
    assert err < 5e-2

def test_pooling_rules_pick_the_end_of_text_token(folder):
    """New configs pool at the first eos_token_id (padding may repeat it); eos_token_id=2 configs at the
    highest id. A wrong rule would pool a padding token and differ from transformers above; here directly."""
    variant, path, _ = folder
    module, params = convert.load(path)
    ids, _ = token_ids(VARIANTS[variant][2])
    out = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    eos_at = np.array([4, 8, 12, LENGTH - 1])
    np.testing.assert_array_equal(out.pooler_output, np.asarray(out.last_hidden_state)[np.arange(4), eos_at])


def test_export_round_trip_and_transformers_loads_it(folder, tmp_path):
    variant, path, model = folder
    module, params = convert.load(path)
    out = convert.save(tmp_path / "export", module, params)
    assert out.name == "model.safetensors"
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [module.config.class_name] and config["model_type"] == "clip_text_model"
    assert "_class_name" not in config
    _, again = convert.load(tmp_path / "export")
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(flatten(again)[key], value)
    # Every tensor of the transformers file comes back exactly (under the text_model. prefix).
    original, exported = read_state_dict(path), read_state_dict(tmp_path / "export")
    assert len(original) == len(exported)
    for key, value in original.items():
        prefixed = key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"
        np.testing.assert_array_equal(exported[prefixed], value)
    reloaded = getattr(transformers, config["architectures"][0]).from_pretrained(tmp_path / "export").eval()
    ids, mask = token_ids(VARIANTS[variant][2])
    want, got = torch_outputs(model, ids, mask), torch_outputs(reloaded, ids, mask)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
    for name in ("pooler_output", "text_embeds"):
        if name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_old_checkpoint_layout(tmp_path):
    """A Stable Diffusion text_encoder as released: prefixed keys, the position_ids buffer, a transformers 4
    config.json with its bookkeeping keys, eos_token_id 2."""
    torch.manual_seed(1)
    config = transformers.CLIPTextConfig(**{**TINY, "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1})
    model = transformers.CLIPTextModel(config).eval()
    sd = {f"text_model.{k}": v.numpy() for k, v in model.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = np.arange(LENGTH, dtype=np.int64)[None]
    write_safetensors(tmp_path / "model.safetensors", sd)
    old = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
           "model_type": "clip_text_model", "torch_dtype": "float32", "transformers_version": "4.22.0.dev0",
           "dropout": 0.0, "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
           **{k: v for k, v in config.to_dict().items() if k in TINY}, "eos_token_id": 2, "bos_token_id": 0,
           "pad_token_id": 1, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(old))
    module, params = convert.load(tmp_path)
    assert module.config.eos_token_id == 2 and type(module.config) is CLIPTextConfig
    assert_parity(module, params, model, 0)


def test_config_errors_name_the_file_and_key(tmp_path, folder):
    _, path, _ = folder
    config = json.loads((path / "config.json").read_text())
    cls = get_family(config["architectures"][0]).config_cls
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: unknown .* config key\(s\) \['rope_theta'\]"):
        convert.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="model_type is 'clip_vision_model', not 'clip_text_model'"):
        cls.from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        cls.from_diffusers(tmp_path)
    # The other family's config class refuses the folder by its architectures name.
    other = CLIPTextWithProjectionConfig if cls is CLIPTextConfig else CLIPTextConfig
    with pytest.raises(ValueError, match=rf"architectures\[0\] is '{config['architectures'][0]}'"):
        other.from_diffusers(path)


def test_config_round_trip_and_logical_axes():
    for cls in (CLIPTextConfig, CLIPTextWithProjectionConfig):
        config = cls(**TINY, hidden_act="gelu")
        assert cls.from_diffusers(json.loads(json.dumps(config.to_diffusers()))) == config
        specs = flatten(logical_specs(config))
        shapes = flatten(abstract_params(config))
        assert specs.keys() == shapes.keys()
        for key, spec in specs.items():  # every parameter has a name for each axis, some axis named
            assert len(spec) == len(shapes[key].shape) and any(a is not None for a in spec), key
    assert ("text_projection", "kernel") in shapes and ("text_projection", "bias") not in shapes
    # A run config's model block names the family by class name or alias.
    assert build_model({"name": "clip_text_projection", **TINY}).config == CLIPTextWithProjectionConfig(**TINY)
    assert build_model({"name": "CLIPTextModel", **TINY}).config == CLIPTextConfig(**TINY)
    with pytest.raises(ValueError, match="projection_dim=None is not supported"):
        CLIPTextWithProjectionConfig(projection_dim=None)


def test_bad_inputs_are_named():
    config = CLIPTextConfig(**TINY)
    module = CLIPTextModel(config)
    params = jax.tree.map(jnp.zeros_like, abstract_params(config))
    with pytest.raises(ValueError, match="more than max_position_embeddings=16"):
        module.apply({"params": params}, jnp.zeros((1, LENGTH + 1), jnp.int32))
    with pytest.raises(ValueError, match="input_ids must be \\[B, L\\] integer token ids"):
        module.apply({"params": params}, jnp.zeros((1, 4)))


@pytest.mark.parametrize("backend, chunk_size", [("xla", 1024), ("chunked", 5)])
def test_masked_attention_matches_numpy(backend, chunk_size):
    """dot_product_attention's `mask` (causal & padding, as CLIP uses it) on every CPU backend."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 12, 3, 8)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((12, 12), bool))[None, None] & (np.arange(12) < np.array([[9], [12]]))[:, None, None]
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(8)
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
    got = dot_product_attention(q, k, v, backend=backend, chunk_size=chunk_size, mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not broadcast to"):
        dot_product_attention(q, k, v, mask=jnp.ones((2, 1, 12, 5), bool))


def write_tokenizer(folder):
    """A tiny CLIP BPE vocabulary: the letters, each also word-final, 'cat</w>' and 'ab</w>' by merges."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*letters, *(c + "</w>" for c in letters), "ca", "cat</w>", "ab</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\na b</w>\n")
    return {t: i for i, t in enumerate(tokens)}


def test_tokenizer_pads_and_truncates_like_transformers(tmp_path):
    vocab = write_tokenizer(tmp_path / "tokenizer")
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = tokenize(tokenizer, ["a cat", "A  Cat ab" + " z" * 100])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    # Lower-cased, BPE-merged, end-of-text padded (the default pad token), truncated keeping the EOS.
    np.testing.assert_array_equal(ids[0, :5], [bos, vocab["a</w>"], vocab["cat</w>"], eos, eos])
    np.testing.assert_array_equal(ids[0, 4:], eos)
    np.testing.assert_array_equal(ids[1, :5], [bos, vocab["a</w>"], vocab["cat</w>"], vocab["ab</w>"], vocab["z</w>"]])
    assert ids[1, 75] == vocab["z</w>"] and ids[1, 76] == eos
    reference = transformers.CLIPTokenizer(str(tmp_path / "tokenizer" / "vocab.json"),
                                           str(tmp_path / "tokenizer" / "merges.txt"))
    want = reference(["a cat", "A  Cat ab" + " z" * 100], padding="max_length", max_length=77, truncation=True)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(tokenize(tokenizer, "a cat"), ids[:1])
    (tmp_path / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(ValueError, match=r"tokenizer/merges.txt: missing"):
        load_tokenizer(tmp_path / "tokenizer")
