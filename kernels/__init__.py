"""Triton kernels of localprop's fused ops, installed as ``localprop.kernels``.

They run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests
them). Importing this package does not import triton; each op module does.
"""
