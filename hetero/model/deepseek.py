"""The DeepSeek V2/V3 decoder: blocks in reading order; parameter names match the checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from hetero.config import ModelConfig
from hetero.model.attention import MLA
from hetero.model.batch import ForwardBatch, KVCache
from hetero.model.layers import MLP, RMSNorm, Rotary
from hetero.model.moe import MoE


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, attention: str, experts: str) -> None:
        super().__init__()
        self.self_attn = MLA(config, layer, attention)
        if config.is_moe_layer(layer):
            self.mlp = MoE(config, experts)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache, rotary: Rotary
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, cache, rotary)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, attention: str, experts: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, i, attention, experts) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        for layer in self.layers:
            x = layer(x, batch, cache, self.rotary)
        return self.norm(x)


class Transformer(nn.Module):
    """`model(input_ids [T], batch, cache)` -> logits [T, V] (or [B, V] with `last_only`)."""

    def __init__(
        self, config: ModelConfig, attention: str = "absorbed", experts: str = "torch"
    ) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config, attention, experts)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, batch: ForwardBatch, cache: KVCache, last_only: bool = False
    ) -> torch.Tensor:
        h = self.model(input_ids, batch, cache)
        if last_only:
            h = h[batch.last_token_indices]
        return self.lm_head(h).float()

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, num_slots, max_len, device=p.device, dtype=p.dtype)
