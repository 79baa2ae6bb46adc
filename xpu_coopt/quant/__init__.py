"""Weight-only quantization: 4- and 8-bit projections held as they are stored, never expanded to 16 bits.

- int4.py, int8.py: Int4Weight and Int8Weight, the layouts every format is repacked into
- quantized_linear.py: QuantizedLinear, the module that holds either in a model
- gguf_blocks.py: GGUF's Q4_0 / Q4_1 / Q4_K blocks into Int4Weight, Q8_0 / Q6_K into Int8Weight
- gguf_model.py: a GGUF file as a transformers model skeleton whose projections are QuantizedLinear
- gptq.py: GPTQ and AWQ tensors into Int4Weight
- hf_quantized.py: a GPTQ or AWQ folder as such a skeleton
- hf_folder.py: a 16-bit folder as such a skeleton, quantized one projection at a time while loading
- rtn.py: round-to-nearest int4 and int8 of a 16-bit weight (optimize(weight_dtype="int4" or "int8"))
- gemm.py: what the device backends' quantized GEMMs do around their kernels
"""

from xpu_coopt.quant.int4 import Int4Weight
from xpu_coopt.quant.int8 import Int8Weight
from xpu_coopt.quant.quantized_linear import QuantizedLinear, QuantizedWeight

__all__ = ["Int4Weight", "Int8Weight", "QuantizedLinear", "QuantizedWeight"]
