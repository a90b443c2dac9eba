"""Bounded, double-buffered staging of a layer's packed experts on their way to the GPU (long
prefill: hetero.sched.streaming).

Only the experts a chunk routes to are sent, in groups whose packed bytes fit one slot. Two host
slots (pinned where CUDA is) and two device slots: the engine's threads gather group g+1's rows
into host slot (g+1) % 2 while group g's copy and compute run; a host slot is refilled only once
its previous copy has left it, and a device slot is overwritten only once the compute that read
it is done (CUDA events on each side). On the CPU (tests) the same code runs with plain copies.
Memory: 2 x slot_bytes host + 2 x slot_bytes device (`runtime.staging_gb`, counted by the plan).

`direct` (runtime `pin_experts`): the layers' packed arrays are page-locked in place once
(`register_host`, cudaHostRegister), so a group's rows cross PCIe straight from them (one copy a
run of consecutive rows an array) and no thread gathers: what is left is PCIe itself.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import NamedTuple

import numpy as np
import torch
from numba import njit, prange

from hetero.cpu_experts.formats import PackedExperts, as_tensor

JIT = {"nogil": True, "cache": True}


@njit(parallel=True, **JIT)
def gather_rows(src, rows, dst):
    """dst[i] = src[rows[i]] for uint8 views src [E, n], dst [>= len(rows), n], by all threads
    (one core copies at ~10 GB/s; PCIe takes ~50)."""
    n, chunk = src.shape[1], 1 << 18
    per_row = (n + chunk - 1) // chunk
    for item in prange(rows.shape[0] * per_row):
        i, c = item // per_row, item % per_row
        a, b = c * chunk, min((c + 1) * chunk, n)
        dst[i, a:b] = src[rows[i], a:b]


def group_rows(rows: np.ndarray, expert_bytes: int, slot_bytes: int) -> list[np.ndarray]:
    """The rows (experts) to send, in groups of at most slot_bytes of packed weights each.
    (Smaller first and last groups, for the pipeline's fill and tail, measured no gain on the
    H200: 2026-12-04, bench/results/2026-12-04-h200-session12.md.)"""
    per = slot_bytes // expert_bytes
    if per < 1:
        raise ValueError(
            f"a staging slot of {slot_bytes} bytes holds no expert of {expert_bytes} bytes "
            "(raise runtime.staging_gb)"
        )
    return [rows[i : i + per] for i in range(0, len(rows), per)]


def _as_bytes(a: np.ndarray) -> np.ndarray:
    """[E, ...] -> its uint8 view [E, bytes an expert]."""
    return np.ascontiguousarray(a).reshape(a.shape[0], -1).view(np.uint8)


class Group(NamedTuple):
    """A group of experts in a host slot: each array's (byte offset, numpy dtype, shape)."""

    slot: int
    rows: np.ndarray  # the layer's rows (experts) it holds, in order
    layout: tuple[tuple[int, np.dtype, tuple[int, ...]], ...]
    nbytes: int
    source: PackedExperts | None = None  # direct: the rows are copied from here, not the slot


class GroupStaging:
    def __init__(self, slot_bytes: int, device: torch.device | str, direct: bool = False) -> None:
        self.slot_bytes, self.device = int(slot_bytes), torch.device(device)
        self.cuda, self.direct = self.device.type == "cuda", direct
        self._host: list[torch.Tensor | None] = [None, None]
        self._dev: list[torch.Tensor | None] = [None, None]
        self._copied: list = [None, None]  # events: the slot's host -> device copy done
        self._used: list = [None, None]  # events: the compute reading the device slot done
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _slot(self, bufs: list, s: int, device: torch.device | str) -> torch.Tensor:
        if bufs[s] is None:
            pin = self.cuda and torch.device(device).type == "cpu"
            with torch.inference_mode(False):  # (outlives the call; see host_buffers)
                bufs[s] = torch.empty(self.slot_bytes, dtype=torch.uint8, device=device,
                                      pin_memory=pin)  # fmt: skip
        return bufs[s]

    def fill(self, s: int, layer: PackedExperts, rows: np.ndarray) -> Group:
        """Host slot s <- the packed rows `rows` of each of the layer's arrays, gathered by all
        threads (call it on the engine's worker)."""
        n, idx = len(rows), np.ascontiguousarray(rows, dtype=np.int64)
        arrays = [(_as_bytes(a), a) for a in layer.arrays().values()]
        need = sum(-(-n * b.shape[1] // 64) * 64 for b, _ in arrays)
        if need > self.slot_bytes:
            raise ValueError(f"{n} experts need {need} bytes, a slot holds {self.slot_bytes}")
        if not self.direct:
            if self._copied[s] is not None:
                self._copied[s].synchronize()  # the slot's last copy has left it
            buf = self._slot(self._host, s, "cpu").numpy()
        layout, at = [], 0
        for src, a in arrays:
            size = n * src.shape[1]
            if not self.direct:
                gather_rows(src, idx, buf[at : at + size].reshape(n, src.shape[1]))
            layout.append((at, a.dtype, (n, *a.shape[1:])))
            at += -(-size // 64) * 64
        return Group(s, idx, tuple(layout), at, layer if self.direct else None)

    def to_device(self, group: Group) -> list[torch.Tensor]:
        """Device slot <- the group (asynchronously, on the copy stream, once the compute that
        last read that slot is done) -> the arrays' rows as tensors there (as_tensor's
        dtypes: bf16 bits become bfloat16)."""
        s = group.slot
        dev = self._slot(self._dev, s, self.device)
        if not self.cuda:
            self._copy(group, dev)
        else:
            with torch.cuda.stream(self.copy_stream):
                if self._used[s] is not None:
                    self.copy_stream.wait_event(self._used[s])
                self._copy(group, dev)
                self._copied[s] = torch.cuda.Event()
                self._copied[s].record(self.copy_stream)
        return [_view(dev, at, dtype, shape) for at, dtype, shape in group.layout]

    def _copy(self, group: Group, dev: torch.Tensor) -> None:
        """The group into device slot `dev`: the host slot in one copy, or (direct) each run of
        consecutive rows of each array straight from the page-locked arrays."""
        if group.source is None:
            dev[: group.nbytes].copy_(self._host[group.slot][: group.nbytes], non_blocking=True)
            return
        breaks = np.flatnonzero(np.diff(group.rows) != 1) + 1
        runs = np.split(np.arange(len(group.rows)), breaks)  # positions of consecutive rows
        for (at, _, _), a in zip(group.layout, group.source.arrays().values()):
            src = as_tensor(_as_bytes(a))  # [E, bytes a row] (page-locked: copies are async)
            width = src.shape[1]
            for run in runs:
                first, n = int(group.rows[run[0]]), len(run)
                lo = at + int(run[0]) * width
                dev[lo : lo + n * width].copy_(src[first : first + n].reshape(-1),
                                               non_blocking=True)  # fmt: skip

    def ready(self, group: Group) -> None:
        """The current stream waits for the group's copy (before a compute reads it)."""
        if self.cuda and self._copied[group.slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied[group.slot])

    def release(self, group: Group) -> None:
        """The compute reading the group is queued: the next copy into its slot waits for it."""
        if self.cuda:
            self._used[group.slot] = torch.cuda.Event()
            self._used[group.slot].record(torch.cuda.current_stream(self.device))


class HostRegistration(NamedTuple):
    """Page ranges locked by `register_host`: (address, bytes) each; `nbytes`: the arrays'."""

    ranges: tuple[tuple[int, int], ...]
    nbytes: int

    def release(self) -> None:
        """Unlocks them: before the arrays are freed, or the driver keeps the old pages."""
        cudart = torch.cuda.cudart()
        for at, _ in self.ranges:
            if int(cudart.cudaHostUnregister(at)):
                clear_cuda_error()


def register_host(layers: list[PackedExperts]) -> HostRegistration:
    """Page-locks the layers' packed arrays in place (cudaHostRegister) for `direct` staging,
    as whole pages: arrays that share a page (small layers) are locked as one range. Ranges
    with a read-only map (a store) are registered read-only. Whole pages: an array's pages must
    hold nothing else (`own_pages` makes them so for arrays on the heap). Raises RuntimeError,
    having unlocked what it locked, if the driver refuses one."""
    page, spans = mmap.PAGESIZE, []
    for a in unique_arrays(layers):
        lo, hi = a.ctypes.data // page * page, -(-(a.ctypes.data + a.nbytes) // page) * page
        spans.append((lo, hi, a.flags.writeable, a.nbytes))
    merged: list[list] = []  # [lo, hi, writeable]
    for lo, hi, writeable, _ in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1][1:] = [max(hi, merged[-1][1]), merged[-1][2] and writeable]
        else:
            merged.append([lo, hi, writeable])
    cudart, done = torch.cuda.cudart(), []
    for lo, hi, writeable in merged:
        err = int(cudart.cudaHostRegister(lo, hi - lo, 0 if writeable else 8))  # 8: read-only
        if err:
            clear_cuda_error()
            HostRegistration(tuple(done), 0).release()
            raise RuntimeError(f"page-locking {hi - lo} bytes of CPU experts failed "
                               f"(cudaHostRegister: error {err})")  # fmt: skip
        done.append((lo, hi - lo))
    return HostRegistration(tuple(done), sum(s[3] for s in spans))


OWN_PAGES_BYTES = 32 << 20  # glibc serves allocations this large by mmap: pages of their own


def own_pages(layers: dict[int, PackedExperts]) -> dict[int, PackedExperts]:
    """The layers with each array under OWN_PAGES_BYTES copied into pages of its own (an
    anonymous map) for `register_host`, which locks whole pages: a small array on the heap
    shares its first and last page with other allocations, and a later copy of such a neighbour
    that runs past the locked range is refused by the driver ("invalid argument", seen in the
    gpu tests of tiny models). Arrays shared between layers stay shared."""
    copies: dict[int, np.ndarray] = {}

    def own(a: np.ndarray) -> np.ndarray:
        if a.nbytes == 0 or a.nbytes >= OWN_PAGES_BYTES:
            return a
        if id(a) not in copies:
            buf = mmap.mmap(-1, -(-a.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
            out = np.frombuffer(buf, dtype=a.dtype, count=a.size).reshape(a.shape)  # keeps buf
            np.copyto(out, a)
            copies[id(a)] = out
        return copies[id(a)]

    return {L: PackedExperts(p.fmt, **{k: own(a) for k, a in p.arrays().items()})
            for L, p in layers.items()}  # fmt: skip


def unique_arrays(layers: list[PackedExperts]) -> list[np.ndarray]:
    """The layers' packed arrays with bytes, each once (layers may share arrays)."""
    return list({id(a): a for p in layers for a in p.arrays().values() if a.nbytes}.values())


def clear_cuda_error() -> None:
    """Resets the CUDA runtime's last error after a refused cudart call, which torch would
    otherwise report at its next unrelated check. torch.cuda.cudart() lacks cudaGetLastError:
    it is taken from the libcudart this process has loaded (none found: nothing to do)."""
    with open("/proc/self/maps") as maps:
        libs = sorted({line.split()[-1] for line in maps if "libcudart.so" in line})
    if libs:
        ctypes.CDLL(libs[0]).cudaGetLastError()


def _view(buf: torch.Tensor, at: int, dtype: np.dtype, shape: tuple) -> torch.Tensor:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if dtype == np.uint16:  # bf16 bits (as_tensor's convention)
        return buf[at : at + n].view(torch.bfloat16).view(shape)
    return buf[at : at + n].view(torch.from_numpy(np.empty(0, dtype)).dtype).view(shape)
