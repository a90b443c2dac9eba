"""The engine's host memory: a job's inputs and outputs as views of one allocation, pinned for
CUDA callers and recycled once the caller is done with it (PinnedBuffers); the staging buffer of
layers streamed to the GPU (Staging); weights copied into transparent huge pages.

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
from hetero.cpu_experts.formats import PackedExperts, as_tensor

HUGE_PAGE = 2 << 20
Specs = tuple[tuple[tuple[int, ...], torch.dtype], ...]  # (shape, dtype) of each view


def host_views(specs: Specs, pin: bool) -> list[torch.Tensor]:
    """Host tensors of these (shape, dtype), all views of one buffer, pinned if `pin`; each view
    starts on a 64-byte boundary. Normal tensors even when made under torch.inference_mode (the
    engine's buffers outlive the call that first needs them, and are written in place by later
    calls, with or without inference mode)."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 64) * 64)
    with torch.inference_mode(False):
        buf = torch.empty(max(starts[-1], 1), dtype=torch.uint8, pin_memory=pin)
        return [buf[a : a + n].view(dtype).view(shape)
                for (shape, dtype), a, n in zip(specs, starts, sizes)]  # fmt: skip


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


class Staging:
    """One reusable host buffer for a layer's packed arrays on their way to the GPU (pinned
    where CUDA is): `fill` copies them in with all the engine's threads (on its worker), `to`
    queues the copies to the device. The buffer is overwritten only after the copies out of
    it are done (an event guards it)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def fill(self, packed: PackedExperts) -> list[torch.Tensor]:
        if self._copied is not None:
            self._copied.synchronize()  # the previous layer's copies have left the buffer
        arrays = list(packed.arrays().values())
        total = sum(a.nbytes for a in arrays)
        if self._buffer is None or self._buffer.numel() < total:
            pin = torch.cuda.is_available()
            with torch.inference_mode(False):  # (as host_views)
                self._buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        out, offset = [], 0
        for a in arrays:
            out.append(as_tensor(copy_into(a, self._buffer[offset:].numpy())))
            offset += a.nbytes
        return out

    def to(self, host: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        out = [h.to(device, non_blocking=True) for h in host]
        if torch.device(device).type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return out
