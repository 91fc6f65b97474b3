"""Triton kernels of fastcnn, installed as ``fastcnn.kernels``: pure functions over tensors, no global state."""
