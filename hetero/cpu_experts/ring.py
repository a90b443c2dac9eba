"""Decode jobs back to back with no Python between them: a ring of job slots that one numba loop
(`serve`, on the engine's worker thread, without the GIL) takes in order.

Why: on the H100 machine the worker spent 130-180 us of Python between two decode jobs (the
kernel's return, the pool's future, the next job's call), 5-7% of a V3 layer's 2.3 ms, against
~10 us on a desktop CPU: after streaming ~200 MB of weights its caches hold none of the
interpreter's memory. Here a job is a slot of preallocated (pinned) buffers and a header; the
caller fills them, queues its copies and bumps `ctrl[TAIL]`; `serve` waits for the slot's inputs
(the `arrived` flag the CUDA stream sets) and runs fused.moe_layer_q8 on it, then the next.

Protocol (int64 atomics): the caller publishes a job with TAIL += 1, then starts a server if
none is active (ACTIVE: 0 -> 1). A server idle for `idle_cycles`, or asked to yield because a
job outside the ring is queued (YIELD), sets ACTIVE = 0 and then checks TAIL once more, taking
ACTIVE back if a job came: a job is never left without a server. A slot is reused once its job
has been waited for and the copies out of it have passed (an event), else the engine takes its
ordinary path.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit

from hetero.cpu_experts.formats import PackedExperts
from hetero.cpu_experts.fused import moe_layer_q8, wait_inputs
from hetero.cpu_experts.host_buffers import host_views
from hetero.cpu_experts.ops import _q8_offset
from hetero.cpu_experts.simd_sync import (
    atomic_add,
    atomic_cas,
    atomic_load,
    cycle_counter,
    spin_pause,
)

JIT = {"nogil": True, "cache": True}
DEPENDS = {
    "fused.py": "6cc28e8d78ebb6b9",
    "kernels.py": "2353efb5634e1e6f",
    "kernels_q8.py": "232a03526f9287d2",
    "simd_q8.py": "9ac2d2e1685a1995",
    "simd_sync.py": "c305241e8e8190da",
    "simd_pack.py": "b0ae36ec8e24291a",
}
SLOTS = 4
TAIL, HEAD, ACTIVE, YIELD = 0, 8, 16, 24  # ctrl: one cache line each
SEQ, LAYER, TOKENS, DEFERRED, STATUS = range(5)  # header fields of a slot
QUEUED, DONE, FAILED, HANDED = 0, 1, 2, 3  # STATUS (HANDED: to the worker's GEMM paths)
START, ARRIVED, END = range(3)  # stamps of a slot: cycle counter


@njit(**JIT)
def serve(ctrl, header, stamps, xs, ids, ws, outs, rows, done, arrived, w13s, s13s, w2s, s2s,
          num_experts, rows_per_item, offset, ahead, threads, max_cycles, idle_cycles,
          heavy):  # fmt: skip
    """Takes the ring's jobs in order until it has been idle `idle_cycles` or is asked to yield
    (returns 0), or until the head job has an expert of `heavy` tokens or more (0: never): that
    job is marked HANDED, left at the head, and 1 returned, for the caller to compute it on the
    GEMM paths (`hand_back`) and call this again.
    Slot s: xs [S, Tmax, H], ids/ws [S, Tmax, k], outs [S, 2, Tmax, H], rows [S, E], done and
    arrived [S, 8]; w13s.. the layers' arrays (tuples, indexed by header[s, LAYER])."""
    since = cycle_counter()
    while True:
        head = atomic_load(ctrl, HEAD)
        if atomic_load(ctrl, TAIL) > head:
            s = head % header.shape[0]
            T, L = header[s, TOKENS], header[s, LAYER]
            stamps[s, START] = cycle_counter()
            if heavy > 0 and most_tokens(ids[s, :T], rows[s], arrived[s], max_cycles) >= heavy:
                stamps[s, ARRIVED] = cycle_counter()
                header[s, STATUS] = HANDED
                return 1
            waited = moe_layer_q8(
                xs[s, :T], ids[s, :T], ws[s, :T], rows[s], header[s, DEFERRED], num_experts,
                w13s[L], s13s[L], w2s[L], s2s[L], outs[s], done[s], rows_per_item, offset,
                ahead, threads, arrived[s], max_cycles, stamps[s],
            )  # fmt: skip
            header[s, STATUS] = DONE if waited >= 0 else FAILED
            atomic_add(ctrl, HEAD, 1)
            since = cycle_counter()
            continue
        if atomic_load(ctrl, YIELD) or cycle_counter() - since > idle_cycles:
            atomic_add(ctrl, ACTIVE, -1)
            if atomic_load(ctrl, TAIL) > head and claim(ctrl):
                continue
            return 0
        spin_pause()


@njit(**JIT)
def most_tokens(ids, rows_of, ready, max_cycles):
    """Once the inputs are there: the most tokens any one expert computed here (rows_of[e] >=
    0) has among ids [T, k] (-1: none); 0 if they never came (the job then fails as usual)."""
    if wait_inputs(ready, max_cycles) < 0:
        return 0
    counts = np.zeros(rows_of.shape[0], np.int64)
    top = 0
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if 0 <= e < rows_of.shape[0] and rows_of[e] >= 0:
                counts[e] += 1
                top = max(top, counts[e])
    return top


@njit(**JIT)
def publish(ctrl):
    """A filled slot's job handed to the server (TAIL += 1); whether a server must be started."""
    atomic_add(ctrl, TAIL, 1)
    return claim(ctrl)


@njit(**JIT)
def claim(ctrl):
    """Whether no server was active (ACTIVE is now 1, for the one the caller starts)."""
    return atomic_cas(ctrl, ACTIVE, 0, 1)


class DecodeRing:
    """The slots of jobs of up to `tokens` tokens and k experts a token, for `layers` (their
    arrays all of one numba type: see `supports`), and the host-side state of each slot."""

    def __init__(self, layers: dict[int, PackedExperts], tokens: int, k: int, pin: bool) -> None:
        first = next(iter(layers.values()))
        H, E, S = first.hidden, first.num_experts, SLOTS
        specs = (((S, tokens, H), torch.float32), ((S, tokens, k), torch.int64),
                 ((S, tokens, k), torch.float32), ((S, 2, tokens, H), torch.float32),
                 ((S, 8), torch.int64))  # fmt: skip
        self.x, self.ids, self.w, self.outs, self.arrived = host_views(specs, pin)
        self._arrived = self.arrived.numpy()  # (numpy's writes cost less Python than torch's)
        self.index = {L: i for i, L in enumerate(layers)}  # engine layer -> position in tuples
        self.layers = tuple(layers)  # position -> engine layer
        self.arrays = tuple(tuple(getattr(p, n) for p in layers.values()) for n in _ARRAYS)
        self.num_experts = E
        self.rows = np.zeros((S, E), np.int64)
        self.done = np.zeros((S, 8), np.int64)
        self.header = np.zeros((S, 8), np.int64)
        self.stamps = np.zeros((S, 8), np.int64)
        self.ctrl = np.zeros(32, np.int64)
        self.seq = 0  # jobs published
        self.busy = [False] * S  # a slot's job not yet waited for in full
        self.events: list[torch.cuda.Event | None] = [None] * S  # copies out of a slot
        self.errors: dict[int, Exception] = {}  # seq -> why its job failed
        self._views: dict[tuple[int, int, int], tuple] = {}  # see `views`

    @staticmethod
    def tokens_for(layers: dict[int, PackedExperts], config) -> int:
        """Tokens a ring job may have for these layers under an EngineConfig (0: no ring, where
        the config says so or the layers differ in type or do not take int8 activations)."""
        if not (config.ring and config.int8_activations and DecodeRing.supports(layers)):
            return 0
        if any(_q8_offset(p, True) is None for p in layers.values()):
            return 0
        return max(0, config.ring_tokens)

    @staticmethod
    def supports(layers: dict[int, PackedExperts]) -> bool:
        """All layers' arrays of one numba type each, and of one shape family (tuples of them
        index by a runtime layer)."""
        first = next(iter(layers.values()))
        kinds = {(p.fmt, p.hidden, p.inter, p.num_experts) for p in layers.values()}
        types_ = {tuple(numba.typeof(getattr(p, n)) for n in _ARRAYS) for p in layers.values()}
        return len(kinds) == 1 and len(types_) == 1 and first.num_experts > 0

    def views(self, s: int, T: int, parts: int) -> tuple:
        """Slot s's buffers for a job of T tokens and `parts` parts: ((x, ids, w), arrived,
        outs, done), made once (torch's slicing costs microseconds of the caller's Python a
        job, on the critical path of a decode step)."""
        key = (s, T, parts)
        if key not in self._views:
            self._views[key] = ((self.x[s, :T], self.ids[s, :T], self.w[s, :T]),
                                self.arrived[s, :1], self.outs[s, :parts, :T],
                                self.done[s, :parts])  # fmt: skip
        return self._views[key]

    def take(self) -> int | None:
        """The next slot if it is free (its job waited for, the copies out of it done)."""
        s = self.seq % SLOTS
        if self.busy[s] or (self.events[s] is not None and not self.events[s].query()):
            return None
        return s

    def fill(self, s: int, layer: int, T: int, deferred: int, rows: np.ndarray) -> None:
        """Slot s's header for a job (its inputs are copied by the caller); flags cleared."""
        self.header[s, : STATUS + 1] = (self.seq, self.index[layer], T, deferred, QUEUED)
        self.rows[s] = rows
        self.done[s] = 0
        self._arrived[s] = 0
        self.busy[s] = True

    def publish(self) -> bool:
        """The filled slot's job goes to the server; True if the caller must start one."""
        self.seq += 1
        return bool(publish(self.ctrl))

    def finished(self, s: int, seq: int) -> bool:
        return self.header[s, SEQ] != seq or self.header[s, STATUS] in (DONE, FAILED)

    def error(self, s: int, seq: int) -> Exception | None:
        if self.header[s, SEQ] == seq and self.header[s, STATUS] == FAILED:
            why = "a CPU expert job's inputs did not arrive in time"
            return self.errors.pop(seq, RuntimeError(why))
        return None

    def release(self, s: int, event: torch.cuda.Event | None) -> None:
        self.busy[s], self.events[s] = False, event

    def abandon(self, s: int, seq: int, waited: np.ndarray) -> None:
        """A job dropped by its caller before every part was waited for (an error mid-step):
        its slot is freed once the job has run (nothing copies out of it then)."""
        if not waited.all() and self.header[s, SEQ] == seq and self.finished(s, seq):
            self.release(s, None)

    def run(
        self, rows_per_item: int, offset: int, ahead: int, max_cycles: int, idle: int, heavy: int
    ) -> bool:
        """The server: `serve` on this ring (called on the engine's worker thread); True when
        it stopped at a job handed back (`head_job`, then `hand_back`)."""
        return 1 == serve(
            self.ctrl, self.header, self.stamps, self.x.numpy(), self.ids.numpy(),
            self.w.numpy(), self.outs.numpy(), self.rows, self.done, self.arrived.numpy(),
            *self.arrays, self.num_experts, rows_per_item, offset, ahead,
            numba.get_num_threads(), max_cycles, idle, heavy,
        )  # fmt: skip

    def head_job(self) -> tuple[int, int, int, int]:
        """(slot, position of its layer in `index`, tokens, deferred) of the job at the head."""
        s = int(self.ctrl[HEAD]) % SLOTS
        return s, *(int(v) for v in self.header[s, [LAYER, TOKENS, DEFERRED]])

    def hand_back(self, s: int, arrived: int, end: int, parts: int) -> None:
        """The head job (slot s), computed by the caller into its outs: its stamps, then each
        part's flag, and the ring goes on (HEAD += 1; the server is still ACTIVE). The flags
        before the status, as `serve` orders them: a waiter that sees the job finished must
        find its parts written."""
        self.stamps[s, ARRIVED], self.stamps[s, END] = arrived, end
        self.done[s, :parts] += 1
        self.header[s, STATUS] = DONE
        self.ctrl[HEAD] += 1

    def fail_head(self, why: Exception) -> bool:
        """After an error in `serve`: the job it was on fails, the ring goes on without it;
        True if the caller must start a server again (jobs are waiting)."""
        head = int(self.ctrl[HEAD])
        s = head % SLOTS
        self.errors[int(self.header[s, SEQ])] = why
        self.header[s, STATUS] = FAILED
        self.ctrl[HEAD] = head + 1
        self.ctrl[ACTIVE] = 0
        return self.ctrl[TAIL] > self.ctrl[HEAD] and bool(claim(self.ctrl))


class RingFuture:
    """What a ring job offers `CPUExperts.wait` in place of a pool future."""

    def __init__(self, ring: DecodeRing, slot: int, seq: int) -> None:
        self.ring, self.slot, self.seq = ring, slot, seq

    def done(self) -> bool:
        return self.ring.finished(self.slot, self.seq)

    def result(self) -> None:
        why = self.ring.error(self.slot, self.seq)
        if why is not None:
            raise why


_ARRAYS = ("w13", "s13", "w2", "s2")
