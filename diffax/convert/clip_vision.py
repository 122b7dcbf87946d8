"""transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection` <-> diffax: the CLIP image encoders' table.

    module, params = diffax.convert.load("clip-vision-folder")   # config.json + model.safetensors
    diffax.convert.save("exported", module, params)              # transformers' from_pretrained loads it

The diffax tree mirrors transformers 4's state dict (`vision_model.embeddings.…`, `vision_model.encoder.…`,
`visual_projection.weight`), so only two things are family rules, as for the text encoders
(diffax.convert.clip):
  - transformers 5 saves a bare `CLIPVisionModel` without its `vision_model.` prefix; import accepts both,
    export writes the prefixed form, which transformers 4 and 5 both load (`WithProjection` files have
    the prefix in both versions);
  - older files hold the `position_ids` buffer, which is no weight: dropped on import.
`class_embedding` [D] is a bare parameter: the generic rules keep it as it is.
"""
from __future__ import annotations

from diffax.convert.clip import WEIGHTS_NAME, drop_position_ids
from diffax.convert.registry import Converter, register

RENAMES = ((r"^(embeddings|pre_layrnorm|encoder|post_layernorm)\.", r"vision_model.\1."),)
EMBEDDING_KEYS = (r"embeddings\.position_embedding\.weight$",)

for _name in ("CLIPVisionModel", "CLIPVisionModelWithProjection"):
    register(Converter(_name, renames=RENAMES, embedding_keys=EMBEDDING_KEYS, import_hook=drop_position_ids,
                       weights_name=WEIGHTS_NAME))
