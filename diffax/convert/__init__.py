"""PyTorch <-> diffax weights, one way in and one way out for every model family.

    import diffax.convert
    module, params = diffax.convert.load("path/to/diffusers/folder")   # or a pipeline folder, a DiT .pt, a hub id
    diffax.convert.save("exported", module, params)                    # diffusers' from_pretrained loads it

    python -m diffax.convert SRC DST [--to diffusers|reference]         # the same from the command line

Each family adds a table and hooks in its own file (unet2d.py, dit.py) to the converter registry
(registry.py); the generic tensor rules are in rules.py and the weight-file I/O in io.py.
"""
from diffax.convert import dit, unet2d  # noqa: F401  (importing registers each family's converter)
from diffax.convert import unet2d_condition  # noqa: F401
from diffax.convert import clip  # noqa: F401
from diffax.convert import controlnet  # noqa: F401
from diffax.convert import vae  # noqa: F401
from diffax.convert import clip_vision, safety_checker  # noqa: F401
from diffax.convert.api import load, save
from diffax.convert.io import CheckpointError
from diffax.convert.registry import Converter, ReferenceLayout, converters, register
from diffax.convert.single_file import infer_model_type, load_single_file, save_single_file

__all__ = ["CheckpointError", "Converter", "ReferenceLayout", "converters", "infer_model_type", "load",
           "load_single_file", "register", "save", "save_single_file"]
