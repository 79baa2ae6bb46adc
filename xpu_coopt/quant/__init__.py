"""Weight-only quantization: 4-bit projections held as they are stored, never expanded to 16 bits.

int4.py           Int4Weight, the one layout every format is repacked into, and QuantizedLinear
gguf_blocks.py    GGUF's Q4_0 / Q4_1 blocks into Int4Weight; other GGUF types dequantized
gguf_model.py     a GGUF file as a transformers model skeleton whose projections are QuantizedLinear
"""

from xpu_coopt.quant.int4 import Int4Weight, QuantizedLinear

__all__ = ["Int4Weight", "QuantizedLinear"]
