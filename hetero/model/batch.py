"""What one forward pass needs to know about its batch, and the latent KV caches it reads/writes.

Two caches with one interface (`write`, `context`, `gather`): `KVCache`, a contiguous row per
sequence (the static batch of hetero.generate, and the reference), and `PagedKVCache`, fixed-size
pages from one pool that the serving engine hands out through per-sequence page tables."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from hetero.config import ModelConfig


@dataclass(frozen=True)
class ForwardBatch:
    """A batch of sequences, their new tokens flattened into one [T] axis.

    Sequence i brings `q_lens[i]` new tokens and, after this step, has `ctx_lens[i]` tokens in the
    cache (prefill: q_len == ctx_len; decode: q_len == 1). In a contiguous cache it owns row
    `slots[i]`; in a paged one the pages `page_table[i]`, and new token t goes to cache row
    `slot_mapping[t]` (page * page_size + offset).
    """

    positions: torch.Tensor  # [T] position of each new token in its sequence
    token_slots: torch.Tensor  # [T] contiguous cache row of each new token's sequence
    slots: tuple[int, ...]
    q_lens: tuple[int, ...]
    ctx_lens: tuple[int, ...]
    page_table: torch.Tensor | None = None  # [B, P] int32 pages of each sequence (0: padding)
    slot_mapping: torch.Tensor | None = None  # [T] paged cache row of each new token
    # an attention backend's plan for this batch, made by its owner before the step (CUDA
    # graphs: hetero.sched.graphs plans flashinfer's before each replay); None: its own
    mla_plan: object | None = None

    @classmethod
    def build(
        cls,
        slots: list[int],
        q_lens: list[int],
        ctx_lens: list[int],
        device: torch.device | str = "cpu",
    ) -> ForwardBatch:
        positions = [p for q, c in zip(q_lens, ctx_lens) for p in range(c - q, c)]
        token_slots = [s for s, q in zip(slots, q_lens) for _ in range(q)]
        return cls(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            token_slots=torch.tensor(token_slots, dtype=torch.long, device=device),
            slots=tuple(slots),
            q_lens=tuple(q_lens),
            ctx_lens=tuple(ctx_lens),
        )

    @classmethod
    def paged(
        cls,
        page_tables: list[list[int]],
        q_lens: list[int],
        ctx_lens: list[int],
        page_size: int,
        device: torch.device | str = "cpu",
    ) -> ForwardBatch:
        """Sequence i's pages in order (`page_tables[i]`, enough for ctx_lens[i] tokens)."""
        positions = [p for q, c in zip(q_lens, ctx_lens) for p in range(c - q, c)]
        rows = [
            pages[p // page_size] * page_size + p % page_size
            for pages, q, c in zip(page_tables, q_lens, ctx_lens)
            for p in range(c - q, c)
        ]
        width = max(map(len, page_tables), default=0)
        table = [pages + [0] * (width - len(pages)) for pages in page_tables]
        B = len(q_lens)
        return cls(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            token_slots=torch.tensor(
                [i for i, q in enumerate(q_lens) for _ in range(q)], dtype=torch.long, device=device
            ),  # fmt: skip
            slots=tuple(range(B)),
            q_lens=tuple(q_lens),
            ctx_lens=tuple(ctx_lens),
            page_table=torch.tensor(table, dtype=torch.int32, device=device).view(B, width),
            slot_mapping=torch.tensor(rows, dtype=torch.long, device=device),
        )

    @property
    def is_decode(self) -> bool:
        """One new token for every sequence (then tokens and sequences are the same axis)."""
        return all(q == 1 for q in self.q_lens)

    @cached_property
    def seq_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 on the batch's device: q_starts [B + 1] (sequence i's new tokens are rows
        q_starts[i] .. q_starts[i+1] - 1) and ctx_lens [B], what attention kernels take (made
        once a batch, not once a layer)."""
        starts = [0]
        for q in self.q_lens:
            starts.append(starts[-1] + q)
        device = self.positions.device
        return (
            torch.tensor(starts, dtype=torch.int32, device=device),
            torch.tensor(self.ctx_lens, dtype=torch.int32, device=device),
        )

    @property
    def last_token_indices(self) -> torch.Tensor:
        """[B] index into the flattened tokens of each sequence's last new token."""
        ends = torch.tensor(self.q_lens, device=self.positions.device).cumsum(0)
        return ends - 1


class KVCache:
    """MLA's compressed cache: per token only the normalized latent and the rotated rope key.

    Both attention forms read it: the naive one decompresses K/V from the latent, the absorbed
    one attends in latent space. Laid out [layer, slot, position, dim]: a row per sequence.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        L = config.num_hidden_layers
        self.max_len = max_len
        self.latent = torch.zeros(
            L, num_slots, max_len, config.kv_lora_rank, device=device, dtype=dtype
        )
        self.rope = torch.zeros(
            L, num_slots, max_len, config.qk_rope_head_dim, device=device, dtype=dtype
        )

    def write(
        self, layer: int, batch: ForwardBatch, latent: torch.Tensor, rope: torch.Tensor
    ) -> None:
        """latent [T, kv_lora_rank], rope [T, rope_dim] stored at each token's slot and position."""
        if max(batch.ctx_lens, default=0) > self.max_len:
            raise ValueError(
                f"sequence of {max(batch.ctx_lens)} tokens exceeds the cache's {self.max_len}"
            )
        self.latent[layer, batch.token_slots, batch.positions] = latent.to(self.latent.dtype)
        self.rope[layer, batch.token_slots, batch.positions] = rope.to(self.rope.dtype)

    def context(self, layer: int, batch: ForwardBatch, i: int) -> tuple[torch.Tensor, ...]:
        """Sequence i's whole context: latent [S, c], rope [S, r] (S = ctx_lens[i])."""
        slot, S = batch.slots[i], batch.ctx_lens[i]
        return self.latent[layer, slot, :S], self.rope[layer, slot, :S]

    def gather(self, layer: int, batch: ForwardBatch, S: int) -> tuple[torch.Tensor, ...]:
        """Decode: every sequence's first S positions, latent [B, S, c], rope [B, S, r]."""
        return self.latent[layer, batch.token_slots, :S], self.rope[layer, batch.token_slots, :S]


class PagedKVCache:
    """The same latent cache in fixed-size pages shared by all sequences: latent
    [layer, page, page_size, c] and rope [layer, page, page_size, r], so one page of one layer is
    contiguous (what a kernel reading through int32 page tables wants). Page 0 is never handed to
    a request: padded rows of a batch write there."""

    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        L, c, r = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
        self.num_pages, self.page_size = num_pages, page_size
        self.latent = torch.zeros(L, num_pages, page_size, c, device=device, dtype=dtype)
        self.rope = torch.zeros(L, num_pages, page_size, r, device=device, dtype=dtype)
        self.state: dict[str, object] = {}  # attention backends' own (flashinfer's plan)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * per_layer * dtype_bytes

    def write(
        self, layer: int, batch: ForwardBatch, latent: torch.Tensor, rope: torch.Tensor
    ) -> None:
        rows = batch.slot_mapping  # [T]
        self.latent[layer].view(-1, self.latent.shape[-1])[rows] = latent.to(self.latent.dtype)
        self.rope[layer].view(-1, self.rope.shape[-1])[rows] = rope.to(self.rope.dtype)

    def context(self, layer: int, batch: ForwardBatch, i: int) -> tuple[torch.Tensor, ...]:
        S = batch.ctx_lens[i]
        pages = batch.page_table[i, : -(-S // self.page_size)].long()  # [n]
        latent = self.latent[layer, pages].flatten(0, 1)[:S]  # [S, c]
        return latent, self.rope[layer, pages].flatten(0, 1)[:S]

    def gather(self, layer: int, batch: ForwardBatch, S: int) -> tuple[torch.Tensor, ...]:
        pages = batch.page_table[:, : -(-S // self.page_size)].long()  # [B, n]
        latent = self.latent[layer][pages].flatten(1, 2)[:, :S]  # [B, S, c]
        return latent, self.rope[layer][pages].flatten(1, 2)[:, :S]


Cache = KVCache | PagedKVCache
