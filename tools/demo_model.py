"""The demo model itself: its settings, its DeepSeek-V3 configuration, the auxiliary-loss-free
routing bias and the training-only dropout, and how it is saved (tools/train_demo.py trains it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig

from hetero.config import ModelConfig
from hetero.testing.tokenizer import BOS_ID, EOS_ID, PAD_ID, save_tokenizer


@dataclass(frozen=True)
class Settings:
    """What shapes the model and its training; stored in training.json."""

    vocab_size: int = 8192
    hidden_size: int = 384
    intermediate_size: int = 1024  # the dense layer
    moe_intermediate_size: int = 96
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    q_lora_rank: int = 128
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    context: int = 512
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    epochs: float = 12.0  # ~2.7M tokens: held-out loss stops improving at ~12 (H100 sweep)
    weight_decay: float = 0.1
    dropout: float = 0.2  # residual and embedding dropout, training only
    grad_clip: float = 1.0
    bias_update_speed: float = 1e-3  # DeepSeek-V3's u for the routing correction bias
    chat_fraction: float = 0.25
    log_every: int = 50
    eval_every: int = 250  # held-out loss during training, for the log only
    completion_tokens: int = 64


TINY = Settings(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    context=64,
    batch_size=8,
    lr=3e-3,
    warmup_steps=2,
    log_every=1,
    eval_every=0,
    completion_tokens=8,
)
# the Settings that are DeepseekV3Config fields (by name: adding a training setting stays safe)
MODEL_FIELDS = tuple(f for f in Settings.__dataclass_fields__ if f in DeepseekV3Config().to_dict())


def model_config(s: Settings) -> DeepseekV3Config:
    return DeepseekV3Config(
        **{k: getattr(s, k) for k in MODEL_FIELDS},
        num_key_value_heads=s.num_attention_heads,
        n_shared_experts=1,
        first_k_dense_replace=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=0,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def routers(model: DeepseekV3ForCausalLM) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


class RoutingBias:
    """DeepSeek-V3's auxiliary-loss-free balancing: count the tokens each routed expert gets during
    a step, then move its correction bias by u against its deviation from the mean load."""

    def __init__(self, model: DeepseekV3ForCausalLM, speed: float) -> None:
        self.gates = routers(model)
        self.speed = speed
        E = model.config.n_routed_experts
        self.loads = [torch.zeros(E, device=model.device) for _ in self.gates]
        for gate, load in zip(self.gates, self.loads):
            gate.register_forward_hook(self._hook(load))

    @staticmethod
    def _hook(load: torch.Tensor):
        def record(gate, inputs, output) -> None:
            if gate.training:  # output: router_logits, topk_weights, topk_indices [T, k]
                ids = output[2].flatten()
                load.index_add_(0, ids, torch.ones_like(ids, dtype=load.dtype))

        return record

    @torch.no_grad()
    def update(self) -> torch.Tensor:
        """Applies the rule after an optimizer step; returns the mean max/mean load ratio, as a
        tensor on the model's device (read it only when logging: no sync every step)."""
        imbalance = torch.zeros((), device=self.loads[0].device)
        for gate, load in zip(self.gates, self.loads):
            gate.e_score_correction_bias += self.speed * torch.sign(load.mean() - load)
            imbalance += load.max() / load.mean().clamp(min=1) / len(self.gates)
            load.zero_()
        return imbalance


def add_dropout(model: DeepseekV3ForCausalLM, p: float) -> None:
    """Dropout on the embeddings and on each attention and MLP output before the residual add, as
    GPT-2 has: the corpus is ~2.7M tokens and a run sees it about twelve times. transformers'
    DeepseekV3 has no such dropout, so hooks add it; they act in train mode only and leave the
    saved model as it is."""

    def drop(module, inputs, output):
        if isinstance(output, tuple):  # attention: (output, weights)
            return (F.dropout(output[0], p, module.training), *output[1:])
        return F.dropout(output, p, module.training)

    if p > 0:
        model.model.embed_tokens.register_forward_hook(drop)
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(drop)
            layer.mlp.register_forward_hook(drop)


def save(model, out: Path, tokenizer) -> None:
    """BF16 weights in one model.safetensors (the routing biases stay fp32 as DeepSeek publishes
    them), config.json, generation_config.json, tokenizer.json, tokenizer_config.json."""
    biases = {n: b.detach().float().cpu() for n, b in model.named_buffers() if "correction" in n}
    model = model.to("cpu", torch.bfloat16)
    for name, bias in biases.items():
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, bias)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    )
    model.save_pretrained(out, max_shard_size="10GB")  # transformers 5 writes "dtype"
    ModelConfig.from_hf(out)  # hetero must read what we ship
    save_tokenizer(tokenizer, out, model.config.max_position_embeddings)
