"""diffusers UNet2DModel <-> diffax `UNet2DModel`: load a diffusers folder or weight file, write one back.

    config, params = load_unet2d("path/to/ddpm-folder")            # config.json + weights
    out = UNet2DModel(config).apply({"params": params}, x, t, labels)
    save_unet2d("exported", config, params)                        # diffusers.UNet2DModel.from_pretrained

Everything except one family rule is generic (`diffax.convert.rules`). The exception: checkpoints saved
before diffusers renamed its attention blocks (early DDPM uploads) name the attention projections
`query`, `key`, `value`, `proj_attn`; diffusers renames them on load, and so do we.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffax.convert import rules
from diffax.convert.io import WEIGHT_NAMES, CheckpointError, read_state_dict, write_safetensors
from diffax.models.layers import unbox
from diffax.models.registry import abstract_params
from diffax.models.unet2d import UNet2DConfig

# Regex renames on torch keys, applied before the generic rules (old attention names -> current ones).
RENAMES = (
    (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
    (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
    (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
    (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
)
# nn.Embedding weights: kept [N, C] and named 'embedding'.
EMBEDDING_KEYS = (r"^class_embedding\.weight$",)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _weight_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"{folder}: no weight file found (looked for {', '.join(WEIGHT_NAMES)})")


def load_unet2d(path: str | os.PathLike, config: UNet2DConfig | None = None,
                **overrides: Any) -> tuple[UNet2DConfig, dict]:
    """Reads a diffusers UNet2DModel into diffax.

    Args:
        path: a diffusers model folder (config.json + diffusion_pytorch_model.{safetensors,bin}, sharded
            or not), or one weight file (.safetensors / .bin / .pt / *.index.json).
        config: the model config; by default read from config.json in the folder (or beside the file).
        overrides: diffax-only config fields for the default config (dtype, param_dtype, attention_backend).
    Returns:
        (config, params): params a nested dict of host numpy arrays in `config.param_dtype`, ready for
        `UNet2DModel(config).apply({'params': params}, ...)` or `jax.device_put` with shardings.
    Raises:
        CheckpointError (a ValueError) naming the file and every missing / unexpected / mis-shaped key;
        ValueError for a config.json this module does not support.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    weights = _weight_file(path) if path.is_dir() else path
    if config is None:
        folder = path if path.is_dir() else path.parent
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{folder / 'config.json'}: missing; pass config= to load the bare weight "
                                  f"file {weights}")
        config = UNet2DConfig.from_diffusers(folder, **overrides)
    state_dict = rules.apply_renames(read_state_dict(weights), RENAMES)
    params = rules.torch_to_flax(state_dict, embedding_keys=EMBEDDING_KEYS, source=str(weights))
    reference = abstract_params(config)
    return config, rules.check_against(params, reference, source=str(weights))


def save_unet2d(folder: str | os.PathLike, config: UNet2DConfig, params: dict) -> Path:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` into `folder`, the layout
    `diffusers.UNet2DModel.from_pretrained(folder)` loads. Tensors keep the dtype of `params`.
    Returns the weight file's path."""
    folder = Path(folder)
    params = unbox(params)
    reference = abstract_params(config)
    # Only the check: the file keeps the dtype the caller's params have (cast them first for fp16 / bf16).
    rules.check_against(params, reference, source="params passed to save_unet2d")
    config.save_config(folder)
    state_dict = rules.flax_to_torch(params)
    path = folder / WEIGHTS_NAME
    write_safetensors(path, state_dict, metadata={"format": "pt"})
    return path
