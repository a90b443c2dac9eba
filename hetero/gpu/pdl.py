"""Programmatic dependent launch (Hopper+): a decode step is ~1100 small kernels one after
another, and each waits ~1 us between its predecessor's end and its own start (H200 profile,
2026-12-04: 1.3 ms of idle GPU in a 10.4 ms step, the same with the whole step in one CUDA
graph). Launched with PDL, a kernel's programs are scheduled while its predecessor finishes and
wait on the GPU (`griddepcontrol.wait`) before touching memory the predecessor may write.

Every kernel launched this way calls `enter(PDL)` first, in every program: it waits for the
previous kernel to complete and flush, then lets the next one launch. Because each waits before
it can complete, the order of the whole chain holds, not just of neighbours. Kernels launched
without PDL (cuBLAS, torch ops) keep ordinary stream order; the wait is a no-op there.

`HETERO_PDL=0` turns it off (A/B runs); it is never used in Triton's interpreter or below sm90.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def pdl_on(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("HETERO_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_kw(on: bool) -> dict:
    """The launch's keyword for `kernel[grid](..., PDL=on, **launch_kw(on))`: none when off
    (the interpreter takes no launch_pdl)."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def enter(PDL: tl.constexpr):
    """A PDL kernel's first step: wait for the previous kernel, then release the next."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
