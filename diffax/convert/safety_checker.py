"""diffusers `StableDiffusionSafetyChecker` <-> diffax: the safety checker's table.

    module, params = diffax.convert.load("sd-folder", subfolder="safety_checker")
    diffax.convert.save("exported/safety_checker", module, params)   # diffusers' from_pretrained loads it

The checker is a transformers `PreTrainedModel`: its folder holds the CLIPConfig json and
`model.safetensors` (`pytorch_model.bin` in the released Stable Diffusion folders). The diffax tree mirrors
the state dict written with transformers 4, which every released checker uses:
`vision_model.vision_model.embeddings.…` (the image tower, a CLIPVisionModel), `visual_projection.weight`,
and the bare tensors `concept_embeds` [17, P], `special_care_embeds` [3, P], `concept_embeds_weights` [17],
`special_care_embeds_weights` [3], which the generic rules keep as they are. Family rules:
  - transformers 5 saves the tower without its inner prefix (`vision_model.embeddings.…`); import accepts
    both, export writes the transformers 4 form, which both versions load;
  - older files hold the `position_ids` buffer, which is no weight: dropped on import.
"""
from __future__ import annotations

from diffax.convert.clip import WEIGHTS_NAME, drop_position_ids
from diffax.convert.registry import Converter, register

RENAMES = ((r"^vision_model\.(embeddings|pre_layrnorm|encoder|post_layernorm)\.", r"vision_model.vision_model.\1."),)
EMBEDDING_KEYS = (r"embeddings\.position_embedding\.weight$",)

register(Converter("StableDiffusionSafetyChecker", renames=RENAMES, embedding_keys=EMBEDDING_KEYS,
                   import_hook=drop_position_ids, weights_name=WEIGHTS_NAME))
