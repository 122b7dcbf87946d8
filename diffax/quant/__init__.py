"""Quantized weights: int8 / int4 weight-only quantization of diffax models (`quantize_params`), run by the
same modules (the Dense / Conv layers dequantise a stored kernel in place, the Embed layer looks rows up
in a stored table), stored as integers + scales in safetensors or Orbax (`diffax.quant.storage`)."""
from diffax.models.qtensor import dequantize_kernel, dequantize_table, lookup_rows, pack_int4, unpack_int4
from diffax.quant.quantize import (EMBEDDING_TABLES, MODES, QuantizationError, QuantizedParams, abstract_quantized,
                                   dequantize, device_bytes, is_quantized, mode_bits, quantize_kernel,
                                   quantize_params, quantize_table, quantized_paths, quantized_specs, selected)
from diffax.quant.storage import load_orbax, load_safetensors, save_orbax, save_safetensors
from diffax.quant.tuneqdm import (apply_scales, init_scales, load_scales, sample_group_timesteps, save_scales,
                                  timestep_group)
