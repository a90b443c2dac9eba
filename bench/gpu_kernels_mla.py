"""bench/gpu_kernels.py's MLA section: `mla_decode` over a paged latent cache (page 64, bf16)
against the torch reference (and flashinfer's paged MLA kernel against it, where installed),
and one sequence's extend step (a chunk after a cached prefix)
through `mla_extend` and through the decompressed form (`attention.mha_sequence`, SDPA). `b` is
gpu_kernels.Bench (its timer, random tensors and output)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from bench import gpu_kernels_shapes as S

log = logging.getLogger("gpu_kernels")
PAGE = 64


def mla_section(b, c) -> None:
    for B in b.plan.mla_batches:
        for ctx in b.plan.mla_contexts:
            kv = S.mla_decode_bytes(B, ctx, c.kv_lora_rank, c.qk_rope_head_dim)
            if kv > b.args.mla_cap_gb * S.GB:
                log.info("mla decode B=%d ctx=%d skipped: %.1f GB of cache", B, ctx, kv / S.GB)
                continue
            mla_decode_point(b, c, B, ctx)
            torch.cuda.empty_cache()
    for T in b.plan.extend_chunks:
        for prefix in b.plan.extend_prefixes:
            mla_extend_point(b, c, T, prefix)
            torch.cuda.empty_cache()


def mla_decode_point(b, c, B: int, ctx: int) -> None:
    from hetero.gpu.mla_decode import mla_decode

    C, R, h, scale = c.kv_lora_rank, c.qk_rope_head_dim, c.num_attention_heads, c.softmax_scale
    latent, rope, table = S.paged(b.gen, [ctx] * B, C, R, PAGE)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q_lat, q_pe = b.randn(B, h, C), b.randn(B, h, R)
    paths = {"kernel": (lambda: mla_decode(q_lat, q_pe, latent, rope, table, lens, scale), True)}
    fi = _flashinfer([1] * B, [ctx] * B, h, C, R, scale, table)
    if fi is not None:
        paths["flashinfer"] = (lambda: fi.run(q_lat, q_pe, latent, rope), True)
    q4, p4 = q_lat[:, None], q_pe[:, None]  # [B, T=1, h, .]
    ref = lambda: S.latent_ref(q4, p4, latent, rope, table, ctx, scale)[:, 0]
    if S.attention_ref_bytes(B * h * ctx, B * ctx, C, R) <= b.args.ref_cap_gb * S.GB:
        paths["ref"] = (ref, True)
    ms = b.time(paths)
    err = S.rel_err(paths["kernel"][0](), ref()) if "ref" in ms else None
    b.emit("mla_decode", {"batch": B, "ctx": ctx, "page": PAGE}, "mla_decode", ms["kernel"],
           "torch_decode_latent", ms.get("ref"), S.mla_decode_flops(B, ctx, h, C, R),
           S.mla_decode_bytes(B, ctx, C, R), rel_err=err)  # fmt: skip
    if fi is not None:
        want = paths["kernel"][0]()
        err = S.rel_err(fi.run(q_lat, q_pe, latent, rope), want)
        b.emit("mla_decode", {"batch": B, "ctx": ctx, "page": PAGE}, "flashinfer",
               ms["flashinfer"], "mla_decode", ms["kernel"], S.mla_decode_flops(B, ctx, h, C, R),
               S.mla_decode_bytes(B, ctx, C, R), rel_err=err)  # fmt: skip


def _flashinfer(q_lens: list[int], ctx_lens: list[int], h: int, C: int, R: int, scale: float,
                table):  # fmt: skip
    """flashinfer's MLA kernel planned for sequences of q_lens new tokens (the last of their
    ctx_lens) over `table`, or None where the package is not installed."""
    from hetero.gpu import flashinfer_mla

    if not flashinfer_mla.available():
        return None
    fi = flashinfer_mla.FlashInferMLA(flashinfer_mla.shared_workspace({}, table.device))
    batch = SimpleNamespace(page_table=table, ctx_lens=ctx_lens, q_lens=q_lens)
    fi.plan(batch, PAGE, h, C, R, scale, torch.bfloat16)
    return fi


def mla_extend_point(b, c, T: int, prefix: int) -> None:
    from hetero.gpu.mla_extend import mla_extend

    C, R, h, scale = c.kv_lora_rank, c.qk_rope_head_dim, c.num_attention_heads, c.softmax_scale
    ctx = prefix + T
    latent, rope, table = S.paged(b.gen, [ctx], C, R, PAGE)
    starts = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    q_lat, q_pe = b.randn(T, h, C), b.randn(T, h, R)
    kernel = lambda: mla_extend(q_lat, q_pe, latent, rope, table, starts, lens, scale,
                                max_q_len=T)  # fmt: skip
    ref = lambda: S.latent_ref(q_lat[None], q_pe[None], latent, rope, table, ctx, scale)[0]
    paths = {"kernel": (kernel, True)}
    fi = _flashinfer([T], [ctx], h, C, R, scale, table)
    if fi is not None:
        paths["flashinfer"] = (lambda: fi.run(q_lat, q_pe, latent, rope), True)
    if S.attention_ref_bytes(T * h * ctx, ctx, C, R) <= b.args.ref_cap_gb * S.GB:
        paths["ref"] = (ref, False)  # eager: a few large ops, and its memory freed at once
    ms = b.time(paths)
    err = S.rel_err(kernel(), ref()) if "ref" in ms else None
    b.emit("mla_extend", {"chunk": T, "prefix": prefix, "page": PAGE}, "mla_extend",
           ms["kernel"], "torch_absorbed_attention", ms.get("ref"),
           S.mla_extend_flops(T, prefix, h, C, R), S.mla_extend_bytes(T, prefix, h, C, R),
           rel_err=err, ctx_avg=prefix + (T + 1) / 2)  # fmt: skip
    if fi is not None:  # causal, its chunk's tokens the last of the context
        b.emit("mla_extend", {"chunk": T, "prefix": prefix, "page": PAGE}, "flashinfer",
               ms["flashinfer"], "mla_extend", ms["kernel"], S.mla_extend_flops(T, prefix, h, C, R),
               S.mla_extend_bytes(T, prefix, h, C, R),
               rel_err=S.rel_err(fi.run(q_lat, q_pe, latent, rope), kernel()),
               ctx_avg=prefix + (T + 1) / 2)  # fmt: skip
    mha_extend_point(b, c, T, prefix, (latent, rope, table), (q_lat, q_pe), ms["kernel"])


def mha_extend_point(b, c, T: int, prefix: int, cache, q, kernel_ms: float) -> None:
    """The same step in the decompressed form (attention.mha_sequence: the context's K/V from
    W_UK/W_UV, then flash attention) against the absorbed kernel just timed; FLOPs its own
    (the decompression, then (nope + r) + v multiply-adds a pair and head)."""
    from hetero.model.attention import mha_sequence

    C, R, h, nope, v = (c.kv_lora_rank, c.qk_rope_head_dim, c.num_attention_heads,
                        c.qk_nope_head_dim, c.v_head_dim)  # fmt: skip
    ctx, (latent, rope, table) = prefix + T, cache
    pages = table[0, : -(-ctx // PAGE)].long()
    lat, k_pe = latent[pages].flatten(0, 1)[:ctx], rope[pages].flatten(0, 1)[:ctx]
    w_uk, w_uv = b.randn(h, nope, C) / C**0.5, b.randn(h, v, C) / C**0.5
    mla = SimpleNamespace(wkv_b=lambda: (w_uk, w_uv), n_heads=h, nope_dim=nope, rope_dim=R,
                          v_dim=v, softmax_scale=c.softmax_scale)  # fmt: skip
    q_nope, q_pe = b.randn(T, h, nope), q[1]
    ms = b.time({"mha": (lambda: mha_sequence(mla, q_nope, q_pe, lat, k_pe), False)})
    pairs = T * (prefix + (T + 1) / 2)
    flops = 2 * ctx * C * h * (nope + v) + 2 * pairs * h * (nope + R + v)
    b.emit("mla_extend", {"chunk": T, "prefix": prefix, "page": PAGE}, "mha_sequence (sdpa)",
           ms["mha"], "mla_extend", kernel_ms, flops, 2 * ctx * (C + R + 2 * h * (nope + R)),
           ctx_avg=prefix + (T + 1) / 2)  # fmt: skip
