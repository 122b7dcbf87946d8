"""diffusers `UNet2DModel` <-> diffax `UNet2DModel`: the family's conversion table.

    module, params = diffax.convert.load("path/to/ddpm-folder")      # config.json + weights
    diffax.convert.save("exported", module, params)                  # diffusers.UNet2DModel.from_pretrained

Everything except one family rule is generic (`diffax.convert.rules`). The exception: checkpoints saved
before diffusers renamed its attention blocks (early DDPM uploads) name the attention projections
`query`, `key`, `value`, `proj_attn`; diffusers renames them on load, and so do we.
"""
from __future__ import annotations

from diffax.convert.registry import Converter, register

# Regex renames on torch keys, applied before the generic rules (old attention names -> current ones).
RENAMES = (
    (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
    (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
    (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
    (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
)
# nn.Embedding weights: kept [N, C] and named 'embedding'.
EMBEDDING_KEYS = (r"^class_embedding\.weight$",)

CONVERTER = register(Converter("UNet2DModel", renames=RENAMES, embedding_keys=EMBEDDING_KEYS))
