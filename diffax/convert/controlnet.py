"""diffusers `ControlNetModel` <-> diffax `ControlNetModel`: the family's conversion table.

    module, params = diffax.convert.load("sd-controlnet-canny")
    diffax.convert.save("exported", module, params)        # diffusers.ControlNetModel.from_pretrained

The generic rules cover every tensor, as for UNet2DConditionModel (whose encoder half a ControlNet
copies): `controlnet_cond_embedding.blocks.3` -> `controlnet_cond_embedding/blocks_3`,
`controlnet_down_blocks.5` -> `controlnet_down_blocks_5` (1x1 convs, OIHW -> HWIO). The one table entry is
the class table of `num_class_embeds` models, an nn.Embedding.
"""
from __future__ import annotations

from diffax.convert.registry import Converter, register

# nn.Embedding weights: kept [N, C] and named 'embedding' (only with num_class_embeds).
EMBEDDING_KEYS = (r"^class_embedding\.weight$",)

CONVERTER = register(Converter("ControlNetModel", embedding_keys=EMBEDDING_KEYS))
