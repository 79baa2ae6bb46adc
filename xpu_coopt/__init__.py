"""xpu_coopt: fast, lean LLaMA-family inference from PyTorch on Intel GPUs, with NVIDIA GPU and CPU fallbacks."""

from xpu_coopt.api import optimize
from xpu_coopt.cache.prefix_cache import PrefixCache
from xpu_coopt.engine import LLM, SamplingParams
from xpu_coopt.errors import BackendUnavailableError, KernelCompileError
from xpu_coopt.gqa import convert_to_gqa
from xpu_coopt.kv_scales import KVScales, calibrate_kv_scales
from xpu_coopt.model.optimized import OptimizedModel
from xpu_coopt.pretrained import from_pretrained

__all__ = [
    "LLM",
    "BackendUnavailableError",
    "KVScales",
    "KernelCompileError",
    "OptimizedModel",
    "PrefixCache",
    "SamplingParams",
    "calibrate_kv_scales",
    "convert_to_gqa",
    "from_pretrained",
    "optimize",
]
__version__ = "0.1.0"
