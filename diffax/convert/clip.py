"""transformers `CLIPTextModel` / `CLIPTextModelWithProjection` <-> diffax: the CLIP text encoders' table.

    module, params = diffax.convert.load("sd-folder/text_encoder")   # config.json + model.safetensors
    diffax.convert.save("exported", module, params)                  # transformers' from_pretrained loads it

A transformers folder names its class in `architectures`, and its weights are `model.safetensors`
(`pytorch_model.bin` in older uploads). The diffax tree mirrors the state dict, so only two things are
family rules:
  - transformers 5 saves a bare `CLIPTextModel` without its `text_model.` prefix (`embeddings.…`,
    `encoder.…`, `final_layer_norm.…`) where every earlier file (all Stable Diffusion text encoders) has
    it; import accepts both, export writes the prefixed form, which transformers 4 and 5 both load;
  - older files hold the `position_ids` buffer (0..76), which is no weight: dropped on import.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from diffax.convert.registry import Converter, Items, register

RENAMES = ((r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1."),)
EMBEDDING_KEYS = (r"embeddings\.(token|position)_embedding\.weight$",)
WEIGHTS_NAME = "model.safetensors"


def drop_position_ids(config: Any, items: Items, source: str) -> Iterator[tuple[str, np.ndarray]]:
    """The state dict without the `embeddings.position_ids` buffer of older files."""
    del config, source
    return ((key, value) for key, value in items if not key.endswith("embeddings.position_ids"))


for _name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
    register(Converter(_name, renames=RENAMES, embedding_keys=EMBEDDING_KEYS, import_hook=drop_position_ids,
                       weights_name=WEIGHTS_NAME))
