"""The baseline a user would otherwise have (bench/decode.py --baseline): transformers'
DeepseekV3ForCausalLM (or V2) with accelerate's device_map keeping the routed experts on the
CPU, which streams them to the GPU at every step."""

from __future__ import annotations

import json
import sys
import time

import torch

from bench.workloads import full_layers, slice_config


@torch.no_grad()
def baseline(args) -> None:
    """transformers + accelerate device_map, the user's alternative: a slice of the workload (1
    dense + 1 MoE layer) whose routed experts device_map keeps on "cpu", which streams them to
    the GPU at every step; the step's time per MoE layer is extrapolated to the whole model."""
    from accelerate import dispatch_model
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
    )

    t_start = time.perf_counter()

    def stage(what: str) -> None:  # to stderr: a run cut off by its time limit says where
        print(f"[{time.perf_counter() - t_start:7.1f} s] {what}", file=sys.stderr, flush=True)

    d = slice_config(args.workload, None)
    moe_layers = full_layers(args.workload)[1]
    d["num_hidden_layers"] = d["first_k_dense_replace"] + 1
    v3 = d["model_type"] == "deepseek_v3"
    cfg = (DeepseekV3Config if v3 else DeepseekV2Config).from_dict(d)
    with torch.device("meta"):
        hf = (DeepseekV3ForCausalLM if v3 else DeepseekV2ForCausalLM)(cfg)
    hf = hf.to(torch.bfloat16)
    experts = "model.layers.1.mlp.experts"
    gpu = 0 if args.device.startswith("cuda") else "cpu"  # "cpu": a smoke run without a GPU
    sync = torch.cuda.synchronize if gpu == 0 else (lambda: None)
    device_map = {"model.embed_tokens": gpu, "model.norm": gpu, "lm_head": gpu}
    device_map |= {"model.rotary_emb": gpu, "model.layers.0": gpu}
    for name, _ in hf.model.layers[1].named_children():
        device_map[f"model.layers.1.{name}"] = gpu
    for name, _ in hf.model.layers[1].mlp.named_children():
        device_map[f"model.layers.1.mlp.{name}"] = "cpu" if name == "experts" else gpu
    del device_map["model.layers.1.mlp"]
    stage("building on the host")
    hf.to_empty(device="cpu")
    for name, p in hf.named_parameters():
        if name.startswith(experts):
            p.data.fill_(0.01)  # 22 GB: a fill, not a random draw
        elif "norm" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0, 0.02)
    for name, b in hf.named_buffers():
        if "correction_bias" in name:
            b.zero_()
    stage("dispatching")
    hf = dispatch_model(hf.eval(), device_map=device_map, main_device=gpu)
    stage("prefill")
    ids = torch.randint(0, cfg.vocab_size, (1, 4), device=args.device)
    out = hf(input_ids=ids, use_cache=True)
    stage("decoding")
    times = []
    for _ in range(args.steps):
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        t0 = time.perf_counter()
        out = hf(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        sync()
        times.append(time.perf_counter() - t0)
        stage(f"step {len(times)}: {times[-1]:.2f} s")
    step = sorted(times)[len(times) // 2]
    print(
        json.dumps(
            {
                "bench": "decode",
                "workload": args.workload,
                "mode": "transformers_device_map",
                "layers": 2,
                "moe_layers": 1,
                "batch": 1,
                "ms": round(step * 1e3, 1),
                "full_model_tokens_per_s_upper_bound": round(1 / (step * moe_layers), 4),
                "note": f"the slice's step time x {moe_layers} MoE layers (dense layers left out)",
            }
        ),
        flush=True,
    )
