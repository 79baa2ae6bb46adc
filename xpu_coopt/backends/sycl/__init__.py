"""The SYCL backend: kernels from sycl_kernels/ compiled at run time by Intel's SYCL runtime compiler.

They are torch's "xpu" kernels for xpu_coopt's ops, and run on CPU tensors too (backend="sycl") through
the OpenCL CPU device, which is how CI proves them. docs/xpu.md has the design.
"""
