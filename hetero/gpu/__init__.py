"""GPU kernels (Triton) and their launchers. Constants the memory plan shares with them live
here, where importing them needs no Triton."""

DEQUANT_BYTES = 2 << 30  # int4 experts' dense copies at prefill, at most, at a time (fused_moe)
