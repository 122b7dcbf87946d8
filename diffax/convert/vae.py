"""diffusers `AutoencoderKL` <-> diffax `AutoencoderKL`: the family's conversion table.

    module, params = diffax.convert.load("path/to/sd-pipeline", subfolder="vae")   # config.json + weights
    diffax.convert.save("exported/vae", module, params)     # diffusers.AutoencoderKL.from_pretrained loads it

The diffax tree mirrors diffusers' state dict (`encoder.down_blocks.0.downsamplers.0.conv.weight` ->
`encoder/down_blocks_0/downsamplers_0/conv/kernel`, `decoder.mid_block.attentions.0.to_out.0.weight` ->
`decoder/mid_block/attentions_0/to_out_0/kernel`), so the generic rules of `diffax.convert.rules` do
everything but one rename: VAE folders saved before diffusers renamed its attention layers (the Stable
Diffusion v1 uploads among them) name the mid blocks' projections `query`, `key`, `value`, `proj_attn`;
diffusers renames them to `to_q`, `to_k`, `to_v`, `to_out.0` on load, and so do we (the U-Net table's
rule, shared).
"""
from __future__ import annotations

from diffax.convert.registry import Converter, register
from diffax.convert.unet2d import RENAMES

CONVERTER = register(Converter("AutoencoderKL", renames=RENAMES))
