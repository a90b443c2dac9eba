"""The host memory of the engine's jobs: one allocation a job, its inputs and outputs as views of
it, pinned for CUDA callers, and recycled once the caller is done with it.

Why recycle: on the H100 host a pinned allocation took ~120 us of the caller's time a job (torch's
caching host allocator), and the caller's submit is on each decode layer's critical path: the
job's input copies, and so the CPU's start, wait for it."""

from __future__ import annotations

import math
import mmap
import threading

import numpy as np
import torch

from hetero.cpu_experts import kernels
from hetero.cpu_experts.formats import PackedExperts

HUGE_PAGE = 2 << 20
Specs = tuple[tuple[tuple[int, ...], torch.dtype], ...]  # (shape, dtype) of each view


def host_views(specs: Specs, pin: bool) -> list[torch.Tensor]:
    """Host tensors of these (shape, dtype), all views of one buffer, pinned if `pin`; each view
    starts on a 64-byte boundary."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 64) * 64)
    buf = torch.empty(max(starts[-1], 1), dtype=torch.uint8, pin_memory=pin)
    return [
        buf[a : a + n].view(dtype).view(shape) for (shape, dtype), a, n in zip(specs, starts, sizes)
    ]


class PinnedBuffers:
    """Pinned job buffers by layout. `take` gives a free one, or a new one; `give` returns one
    with the CUDA event after which the GPU no longer reads it. At most `keep` are kept a
    layout."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._free: dict[Specs, list[tuple[list[torch.Tensor], torch.cuda.Event]]] = {}
        self._lock = threading.Lock()

    def take(self, specs: Specs) -> list[torch.Tensor]:
        with self._lock:
            free = self._free.get(specs, [])
            for i, (views, event) in enumerate(free):
                if event.query():
                    del free[i]
                    return views
        return host_views(specs, pin=True)

    def give(self, specs: Specs, views: list[torch.Tensor], event: torch.cuda.Event) -> None:
        with self._lock:
            free = self._free.setdefault(specs, [])
            if len(free) < self.keep:
                free.append((views, event))


def in_hugepages(packed: PackedExperts) -> PackedExperts:
    """The layer's arrays copied into anonymous memory advised for transparent huge pages
    (MADV_HUGEPAGE: taken where the kernel allows THP on request)."""

    def copy(a: np.ndarray) -> np.ndarray:
        size = -(-max(a.nbytes, 1) // HUGE_PAGE) * HUGE_PAGE
        buf = mmap.mmap(-1, size + HUGE_PAGE)  # page-aligned only: room to start on a 2 MB one
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)
        whole = np.frombuffer(buf, dtype=np.uint8)  # keeps buf alive
        return copy_into(a, whole[-whole.ctypes.data % HUGE_PAGE :])

    arrays = {k: copy(a) for k, a in packed.arrays().items()}
    return PackedExperts(packed.fmt, **arrays)


def copy_into(a: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """a copied, by all the engine's threads, to the start of the bytes dst; that copy as an
    array shaped and typed like a."""
    out = dst[: a.nbytes]
    kernels.copy_bytes(np.ascontiguousarray(a).reshape(-1).view(np.uint8), out)
    return out.view(a.dtype).reshape(a.shape)
