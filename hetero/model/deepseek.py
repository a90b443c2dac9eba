"""The DeepSeek V2/V3 decoder: blocks in reading order; parameter names match the checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from hetero.config import ModelConfig
from hetero.model.attention import MLA
from hetero.model.batch import Cache, ForwardBatch, KVCache, PagedKVCache
from hetero.model.layers import MLP, RMSNorm, Rotary
from hetero.model.moe import MoE, Pending

Resident = Mapping[int, Iterable[int]] | None  # MoE layer -> the expert ids kept as modules


class Block(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        attention: str,
        experts: str,
        resident: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = MLA(config, layer, attention)
        self.is_moe = config.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = MoE(config, experts, resident)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache: Cache,
        rotary: Rotary,
        pending: Pending | None = None,
    ) -> tuple[torch.Tensor, Pending | None]:
        """-> (x, experts deferred to the next layer); a dense layer passes `pending` on."""
        x, h = self.attend(x, batch, cache, rotary)
        if not self.is_moe:
            return x + self.mlp(h), pending
        y, pending = self.mlp(h, pending)
        return x + y, pending

    def attend(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache: Cache,
        rotary: Rotary,
        r: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half: (x + MLA(norm(x)), the post-attention norm of that sum). `r`:
        the previous layer's MLP / MoE output, added to x first (x + r rounded as the plain
        sum; on CUDA in the norm's kernel)."""
        if r is None:
            normed = self.input_layernorm(x)
        else:
            x, normed = self.input_layernorm.add(x, r)
        a = self.self_attn(normed, batch, cache, rotary)
        return self.post_attention_layernorm.add(x, a)


class Decoder(nn.Module):
    def __init__(
        self, config: ModelConfig, attention: str, experts: str, resident: Resident = None
    ) -> None:
        super().__init__()
        resident = resident or {}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, i, attention, experts, resident.get(i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, cache: Cache) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        pending = None
        for layer in self.layers:
            x, pending = layer(x, batch, cache, self.rotary, pending)
        if pending is not None:  # the last MoE layer's deferred experts
            x = x + pending.result()
        return self.norm(x)


class Transformer(nn.Module):
    """`model(input_ids [T], batch, cache)` -> logits [T, V] (or [B, V] with `last_only`).

    `resident`: per MoE layer, the routed experts built as modules here (default: all); the rest
    are computed by the routed-experts backend (e.g. on the CPU)."""

    def __init__(
        self,
        config: ModelConfig,
        attention: str = "absorbed",
        experts: str = "torch",
        resident: Resident = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config, attention, experts, resident)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, batch: ForwardBatch, cache: Cache, last_only: bool = False
    ) -> torch.Tensor:
        h = self.model(input_ids, batch, cache)
        if last_only:
            h = h[batch.last_token_indices]
        return self.lm_head(h).float()

    def absorb_attention(self) -> None:
        """Every MLA layer keeps W_UK / W_UV dense (MLA.absorb)."""
        for layer in self.model.layers:
            layer.self_attn.absorb()

    def fuse_projections(self) -> None:
        """The FP8 matrices that read the same input as one each (MLA's q_a and kv_a, every
        SwiGLU's gate and up; hetero.model.fp8.fuse_fp8): fewer, larger launches at decode,
        the same outputs and memory."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            mlp = layer.mlp
            for m in (mlp, getattr(mlp, "shared_experts", None)):
                if isinstance(m, MLP):
                    m.fuse()

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, num_slots, max_len, device=p.device, dtype=p.dtype)

    def new_paged_cache(self, num_pages: int, page_size: int) -> PagedKVCache:
        p = self.lm_head.weight
        return PagedKVCache(self.config, num_pages, page_size, device=p.device, dtype=p.dtype)
