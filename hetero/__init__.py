"""hetero: DeepSeek-style MoE inference with routed experts on the CPU and the rest on the GPU."""

__version__ = "0.1.0"
