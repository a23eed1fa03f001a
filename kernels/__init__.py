"""Fused kernels for the engine, each beside its plain PyTorch reference, test and micro-benchmark."""
