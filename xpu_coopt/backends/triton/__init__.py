"""The Triton backend: kernels for every op in docs/ops.md, the ops' CUDA kernels.

Triton JIT-compiles them for the GPU on first use; CI runs them on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported).
"""
