"""Weight-only quantization: 4-bit projections held as they are stored, never expanded to 16 bits.

- int4.py: Int4Weight, the one layout every format is repacked into, and QuantizedLinear
- gguf_blocks.py: GGUF's Q4_0 / Q4_1 / Q4_K blocks into Int4Weight
- gguf_model.py: a GGUF file as a transformers model skeleton whose projections are QuantizedLinear
- gptq.py: GPTQ and AWQ tensors into Int4Weight
- hf_quantized.py: a GPTQ or AWQ folder as such a skeleton
- rtn.py: round-to-nearest int4 of a 16-bit weight (optimize(weight_dtype="int4"))
- gemm.py: what the device backends' 4-bit GEMMs do around their kernels
"""

from xpu_coopt.quant.int4 import Int4Weight, QuantizedLinear

__all__ = ["Int4Weight", "QuantizedLinear"]
