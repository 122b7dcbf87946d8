"""diffusers `UNet2DConditionModel` <-> diffax `UNet2DConditionModel`: the family's conversion table.

    module, params = diffax.convert.load("stable-diffusion-v1-5", subfolder="unet")
    diffax.convert.save("exported", module, params)        # diffusers.UNet2DConditionModel.from_pretrained

The generic rules cover every tensor: `proj_in` / `proj_out` are 1x1 convs (4-D, OIHW -> HWIO) in SD 1.x
and Linear layers (2-D, transposed) in SD 2.x / SDXL, which the rules tell apart by rank;
`to_out.0` -> `to_out_0`, `ff.net.0.proj` -> `ff/net_0/proj`, and `time_embedding.linear_1`,
`add_embedding.linear_1` keep their literal names. The one table entry is the class table of
`num_class_embeds` models, an nn.Embedding.
"""
from __future__ import annotations

from diffax.convert.registry import Converter, register

# nn.Embedding weights: kept [N, C] and named 'embedding' (only with num_class_embeds; the 'timestep' and
# 'projection' class embeddings are linear layers, class_embedding.linear_1.weight).
EMBEDDING_KEYS = (r"^class_embedding\.weight$",)

CONVERTER = register(Converter("UNet2DConditionModel", embedding_keys=EMBEDDING_KEYS))
