"""What one forward pass needs to know about its batch, and the latent KV cache it reads/writes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetero.config import ModelConfig


@dataclass(frozen=True)
class ForwardBatch:
    """A batch of sequences, their new tokens flattened into one [T] axis.

    Sequence i owns cache slot `slots[i]`, brings `q_lens[i]` new tokens and, after this step,
    has `ctx_lens[i]` tokens in the cache (prefill: q_len == ctx_len; decode: q_len == 1).
    """

    positions: torch.Tensor  # [T] position of each new token in its sequence
    token_slots: torch.Tensor  # [T] cache slot of each new token
    slots: tuple[int, ...]
    q_lens: tuple[int, ...]
    ctx_lens: tuple[int, ...]

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

    @property
    def is_decode(self) -> bool:
        """One new token for every sequence (then tokens and sequences are the same axis)."""
        return all(q == 1 for q in self.q_lens)

    @property
    def last_token_indices(self) -> torch.Tensor:
        """[B] index into the flattened tokens of each sequence's last new token."""
        ends = torch.tensor(self.q_lens, device=self.positions.device).cumsum(0)
        return ends - 1


class KVCache:
    """MLA's compressed cache: per token only the normalized latent and the rotated rope key.

    Both attention forms read it: the naive one decompresses K/V from the latent, the absorbed
    one attends in latent space. Laid out [layer, slot, position, dim]; paging comes later.
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

    def read(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latent[layer, slot, :length], self.rope[layer, slot, :length]
