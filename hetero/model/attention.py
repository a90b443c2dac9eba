"""Multi-head Latent Attention (MLA), in its two equivalent forms.

Per token the cache holds only `latent` (kv_lora_rank, normalized) and `k_pe` (rope_dim, rotated).
- naive: decompress K/V of the whole context with kv_b_proj, then ordinary attention;
- absorbed: fold W_UK into the query and W_UV into the output, so attention runs in latent space
  and the context is never decompressed (what decode wants: the cache is read once).
Long extend steps (a prompt's chunk) run the naive form through flash attention (`mha_sequence`):
it costs nope + v = 320 multiply-adds a query-key pair and head instead of absorbed's 2 c + r =
1088 (V3's dims), and decompressing the context once is paid back from ~200 new tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from hetero.config import ModelConfig
from hetero.model.batch import Cache, ForwardBatch, PagedKVCache
from hetero.model.fp8 import FP8Linear, dense_weight
from hetero.model.layers import Linear, RMSNorm, Rotary
from hetero.registry import MLA_ATTENTION

MHA_MIN_TOKENS = 256  # new tokens of a sequence from which an extend step runs `mha_sequence`
# extend steps' short sequences through flashinfer with `--attention flashinfer`: off, since on
# the H200 (2026-12-05) a model's second prompt chunk differed from the Triton kernels' by 0.066
# (logits) while flashinfer's extend kernel alone equals a float64 reference; on again once
# tests/test_flashinfer_extend.py's model-level test (which turns it on) passes
FLASHINFER_EXTEND = False
# on the GPU only kernels that never materialize the [q, S] scores (an error, not an OOM)
FLASH = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, backend: str = "absorbed") -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        H, nh, qk = config.hidden_size, self.n_heads, config.qk_head_dim
        if config.q_lora_rank:
            self.q_a_proj = Linear(H, config.q_lora_rank)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(config.q_lora_rank, nh * qk)
        else:
            self.q_proj = Linear(H, nh * qk)
        self.kv_a_proj_with_mqa = Linear(H, self.kv_rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_rank, nh * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(nh * self.v_dim, H)
        self.set_backend(backend)
        self.qkv_a: nn.Module | None = None  # `fuse()`: q_a and kv_a as one FP8 matrix
        # W_UK, W_UV kept dense once `absorb()` ran (not in the checkpoint: not persistent)
        self.register_buffer("w_uk", None, persistent=False)
        self.register_buffer("w_uv", None, persistent=False)

    def set_backend(self, backend: str) -> None:
        """Attend through MLA_ATTENTION's `backend` from now on ("auto" resolved here)."""
        self.attend = MLA_ATTENTION.get(_resolve(backend))
        self.backend = backend

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cache: Cache, rotary: Rotary
    ) -> torch.Tensor:
        T = x.shape[0]
        if self.qkv_a is not None:  # q_a and kv_a in one matrix (`fuse()`)
            q_a, kv_a = self.qkv_a(x).split(
                [self.q_a_proj.out_features, self.kv_rank + self.rope_dim], dim=-1
            )
        else:
            kv_a = self.kv_a_proj_with_mqa(x)
            q_a = self.q_a_proj(x) if hasattr(self, "q_a_proj") else None
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.view(T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        longest = max(batch.ctx_lens, default=0)
        fused = _fused_write(x, cache, self.kv_a_layernorm.weight)
        attend = self.attend
        if attend is flashinfer_attention and batch.is_decode:
            if not _flashinfer_decodes(self, batch, cache):
                attend = paged_attention  # (where flashinfer is slower or does not apply)
        # decode through mla_decode on the GPU: the kernel rotates q_pe itself (a kernel fewer)
        in_kernel = fused and batch.is_decode and attend is paged_attention
        if not in_kernel:
            q_pe = rotary(q_pe, batch.positions, longest)
        if fused:  # one kernel for the four below
            from hetero.gpu.kv_write import kv_write  # triton: imported where it runs

            cos, sin = rotary.full_tables(longest, x.device)
            norm = self.kv_a_layernorm
            kv_write(kv_a, norm.weight, norm.eps, batch.positions, cos, sin,
                     rotary.rope.interleave, batch.slot_mapping, cache.latent[self.layer],
                     cache.rope[self.layer])  # fmt: skip
        else:
            latent, k_pe = kv_a.split([self.kv_rank, self.rope_dim], dim=-1)
            latent = self.kv_a_layernorm(latent)  # [T, kv_rank]
            k_pe = rotary(k_pe[:, None, :], batch.positions, longest)[:, 0]  # [T, rope_dim]
            cache.write(self.layer, batch, latent, k_pe)
        if in_kernel:
            cos, sin = rotary.full_tables(longest, x.device)
            tables = (cos, sin, rotary.rope.interleave)
            o = _latent_kernels(self, q_nope, q_pe, batch, cache, None, tables)
        else:
            o = attend(self, q_nope, q_pe, batch, cache)  # [T, heads, v_dim]
        return self.o_proj(o.flatten(1))

    def wkv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split into W_UK [heads, nope, kv_rank] and W_UV [heads, v, kv_rank]."""
        if self.w_uk is not None:
            return self.w_uk, self.w_uv
        dtype = self.kv_a_layernorm.weight.dtype  # norms are always in the model's dtype
        w = dense_weight(self.kv_b_proj, dtype)
        w = w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def fuse(self) -> None:
        """q_a_proj and kv_a_proj_with_mqa (both read x) as one FP8 matrix where they fuse
        (hetero.model.fp8.fuse_fp8): at decode one launch and weight stream, not two."""
        from hetero.model.fp8 import fuse_fp8

        if hasattr(self, "q_a_proj"):
            self.__dict__["qkv_a"] = fuse_fp8([self.q_a_proj, self.kv_a_proj_with_mqa])

    def absorb(self) -> None:
        """Keeps W_UK and W_UV dense in the model's dtype from now on, instead of dequantizing
        kv_b_proj at every call (~120 us a layer on the H100); the memory plan counts them
        (`absorbed_bytes`). The same values as `wkv_b()` computes each time: outputs do not
        change."""
        w_uk, w_uv = self.wkv_b()
        self.w_uk, self.w_uv = w_uk.contiguous(), w_uv.contiguous()

    @staticmethod
    def absorbed_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
        """What `absorb()` adds, a layer."""
        c = config
        return (
            c.num_attention_heads
            * (c.qk_nope_head_dim + c.v_head_dim)
            * c.kv_lora_rank
            * (dtype.itemsize)
        )


def _fused_write(x: torch.Tensor, cache: Cache, norm_weight: torch.Tensor) -> bool:
    """Whether hetero.gpu.kv_write stores this step's latent and rope key: on CUDA, into pages
    that hold the norm's own dtype (else the cast the unfused path makes would differ)."""
    return (
        x.is_cuda
        and isinstance(cache, PagedKVCache)
        and cache.latent.dtype == torch.result_type(norm_weight, x)
    )


def _per_sequence(batch: ForwardBatch):
    """Yields (token range, sequence index, context length, causal mask [q, ctx]) a sequence."""
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(batch.q_lens, batch.ctx_lens)):
        positions = batch.positions[start : start + q_len]
        mask = torch.arange(ctx_len, device=positions.device)[None, :] > positions[:, None]
        yield slice(start, start + q_len), i, ctx_len, mask
        start += q_len


def naive_attention(mla: MLA, q_nope, q_pe, batch: ForwardBatch, cache: Cache) -> torch.Tensor:
    out = q_nope.new_empty(q_nope.shape[0], mla.n_heads, mla.v_dim)
    for rows, i, ctx_len, mask in _per_sequence(batch):
        latent, k_pe = cache.context(mla.layer, batch, i)  # [S, kv_rank], [S, rope_dim]
        kv = mla.kv_b_proj(latent.to(q_nope.dtype)).view(ctx_len, mla.n_heads, -1)
        k_nope, v = kv.split([mla.nope_dim, mla.v_dim], dim=-1)  # [S, h, nope], [S, h, v]
        scores = torch.einsum("thd,shd->ths", q_nope[rows], k_nope)
        scores += torch.einsum("thr,sr->ths", q_pe[rows], k_pe.to(q_pe.dtype))
        probs = _softmax(scores * mla.softmax_scale, mask)
        out[rows] = torch.einsum("ths,shd->thd", probs, v)
    return out


def absorbed_attention(mla: MLA, q_nope, q_pe, batch: ForwardBatch, cache: Cache) -> torch.Tensor:
    w_uk, w_uv = mla.wkv_b()
    q_lat = torch.einsum("thd,hdc->thc", q_nope, w_uk)  # [T, h, kv_rank]
    if batch.is_decode:
        return torch.einsum("thc,hdc->thd", _decode_latent(mla, q_lat, q_pe, batch, cache), w_uv)
    out_lat = q_nope.new_empty(q_nope.shape[0], mla.n_heads, mla.kv_rank)
    for rows, i, _, mask in _per_sequence(batch):
        latent, k_pe = cache.context(mla.layer, batch, i)
        latent, k_pe = latent.to(q_nope.dtype), k_pe.to(q_nope.dtype)
        scores = torch.einsum("thc,sc->ths", q_lat[rows], latent)
        scores += torch.einsum("thr,sr->ths", q_pe[rows], k_pe)
        probs = _softmax(scores * mla.softmax_scale, mask)
        out_lat[rows] = torch.einsum("ths,sc->thc", probs, latent)
    return torch.einsum("thc,hdc->thd", out_lat, w_uv)  # [T, h, v]


def paged_attention(mla: MLA, q_nope, q_pe, batch: ForwardBatch, cache: Cache) -> torch.Tensor:
    """The absorbed form through the Triton kernels over the paged cache where they apply (CUDA
    tensors, a PagedKVCache): `mla_decode` for decode steps (split-KV), `mla_extend` for the
    rest, long sequences decompressed (`kernel_attention`); else `absorbed_attention`."""
    if not (q_nope.is_cuda and isinstance(cache, PagedKVCache)):
        return absorbed_attention(mla, q_nope, q_pe, batch, cache)
    return kernel_attention(mla, q_nope, q_pe, batch, cache)


def kernel_attention(mla: MLA, q_nope, q_pe, batch: ForwardBatch, cache: PagedKVCache,
                     latent_kernels=None):  # fmt: skip
    """Decode steps: `mla_decode`. Extend steps: sequences of at least MHA_MIN_TOKENS new
    tokens through `mha_sequence` (flash attention), the others together through `mla_extend`
    (or `latent_kernels`, with `_latent_kernels`' arguments)."""
    latent_kernels = latent_kernels or _latent_kernels
    if batch.is_decode:
        return _latent_kernels(mla, q_nope, q_pe, batch, cache, None)
    long = {i for i, q in enumerate(batch.q_lens) if q >= MHA_MIN_TOKENS}
    if not long:
        return latent_kernels(mla, q_nope, q_pe, batch, cache, None)
    out = q_nope.new_empty(q_nope.shape[0], mla.n_heads, mla.v_dim)  # [T, h, v]
    short, short_rows, start = [], [], 0
    for i, q_len in enumerate(batch.q_lens):
        rows, start = slice(start, start + q_len), start + q_len
        if i in long:
            latent, k_pe = cache.context(mla.layer, batch, i)
            out[rows] = mha_sequence(mla, q_nope[rows], q_pe[rows], latent, k_pe)
        else:
            short.append(i)
            short_rows.append(torch.arange(rows.start, rows.stop, device=q_nope.device))
    if short:
        rows = torch.cat(short_rows)  # [T_short]
        out[rows] = latent_kernels(mla, q_nope[rows], q_pe[rows], batch, cache, short)
    return out


def _latent_kernels(mla: MLA, q_nope, q_pe, batch, cache: PagedKVCache, subset, rotary=None):
    """The absorbed form through the Triton kernels; `subset`: these sequences of an extend
    batch only (q_nope / q_pe hold their rows, in order); `rotary`: (cos, sin, interleave) for
    mla_decode to rotate q_pe (decode steps)."""
    from hetero.gpu.mla_decode import mla_decode  # triton: imported where it runs
    from hetero.gpu.mla_extend import mla_extend

    q_lat = _q_latent(mla, q_nope)  # [T, h, c]
    q_pe = q_pe.to(q_lat.dtype)
    if not batch.is_decode:  # (mla_decode reads strided rows; mla_extend wants them dense)
        q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    latent, rope = cache.latent[mla.layer], cache.rope[mla.layer]  # [P, page, c], [P, page, r]
    scale = mla.softmax_scale
    if batch.is_decode:  # context lengths = positions + 1, read on the device (CUDA graphs)
        out = mla_decode(q_lat, q_pe, latent, rope, batch.page_table, batch.positions, scale,
                         lens_offset=1, rotary=rotary)  # fmt: skip
    elif subset is None:
        starts, ctx = batch.seq_tensors  # [B + 1], [B] int32
        out = mla_extend(q_lat, q_pe, latent, rope, batch.page_table, starts, ctx, scale,
                         max_q_len=max(batch.q_lens))  # fmt: skip
    else:
        q_lens = [batch.q_lens[i] for i in subset]
        starts = torch.tensor([0, *q_lens], device=q_lat.device).cumsum(0).to(torch.int32)
        ctx = torch.tensor([batch.ctx_lens[i] for i in subset], dtype=torch.int32,
                           device=q_lat.device)  # fmt: skip
        table = batch.page_table[torch.tensor(subset, device=q_lat.device)]
        out = mla_extend(q_lat, q_pe, latent, rope, table, starts, ctx, scale,
                         max_q_len=max(q_lens))  # fmt: skip
    return _o_from_latent(mla, out)


def _resolve(backend: str) -> str:
    """Backend "auto": flashinfer's where the package is installed (it still decodes only
    where it pays: `flashinfer_mla.decodes`), else "triton"."""
    if backend != "auto":
        return backend
    from hetero.gpu.flashinfer_mla import available

    return "flashinfer" if available() else "triton"


def _flashinfer_decodes(mla: MLA, batch: ForwardBatch, cache: Cache) -> bool:
    from hetero.gpu.flashinfer_mla import decodes

    longest = max(batch.ctx_lens, default=0)
    return decodes(mla.backend, cache, len(batch.q_lens), longest)


def flashinfer_attention(mla: MLA, q_nope, q_pe, batch: ForwardBatch, cache: Cache):
    """Decode steps through flashinfer's MLA kernel (hetero.gpu.flashinfer_mla: one plan a
    step, shared by the layers): MLA.forward sends here only those where it decodes
    (`flashinfer_mla.decodes`), the others to "triton". Extend steps: with backend
    "flashinfer", the short sequences through it too; the rest as "triton"
    (`paged_attention`). q_pe arrives rotated (MLA.forward rotates it for every backend but
    "triton"'s decode kernel)."""
    from hetero.gpu.flashinfer_mla import applies

    if batch.is_decode:
        return _flashinfer_kernel(mla, q_nope, q_pe, batch, cache, None)
    if mla.backend == "flashinfer" and FLASHINFER_EXTEND and applies(cache):
        # extend steps: the short sequences through flashinfer's kernel (causal), the long
        # ones through flash attention as "triton" runs them
        return kernel_attention(mla, q_nope, q_pe, batch, cache, _flashinfer_kernel)
    return paged_attention(mla, q_nope, q_pe, batch, cache)


def _flashinfer_kernel(mla: MLA, q_nope, q_pe, batch: ForwardBatch, cache, subset):
    """flashinfer's MLA kernel over the batch's sequences (`subset`: these ones of an extend
    step, q_nope / q_pe holding their rows in order), planned once a step: by the batch's owner
    (`batch.mla_plan`, CUDA graphs), else here on the cache's planner for its kind of step."""
    from hetero.gpu.flashinfer_mla import FlashInferMLA, shared_workspace

    q_lat = _q_latent(mla, q_nope).to(cache.latent.dtype)  # [T, h, c]
    planner = batch.mla_plan
    if planner is None:
        kind = "flashinfer" if batch.is_decode else "flashinfer_extend"
        planner = cache.state.get(kind)
        if planner is None:
            workspace = shared_workspace(cache.state, q_nope.device)
            planner = cache.state[kind] = FlashInferMLA(workspace)
        planner.plan(batch, cache.page_size, mla.n_heads, mla.kv_rank, mla.rope_dim,
                     mla.softmax_scale, q_lat.dtype, subset=subset)  # fmt: skip
    out = planner.run(q_lat, q_pe.to(q_lat.dtype), cache.latent[mla.layer], cache.rope[mla.layer])
    return _o_from_latent(mla, out)


def _fp8_kv_b(mla: MLA) -> FP8Linear | None:
    """kv_b_proj where W_UK / W_UV are to be read from its FP8 blocks (no dense copies kept)."""
    kv = mla.kv_b_proj
    return kv if mla.w_uk is None and isinstance(kv, FP8Linear) else None


def _q_latent(mla: MLA, q_nope: torch.Tensor) -> torch.Tensor:
    """q_nope [T, h, nope] -> q_lat [T, h, kv_rank] = q_nope W_UK per head: from the dense copy
    `absorb()` kept, else straight from kv_b_proj's FP8 blocks (hetero.gpu.mla_absorb), else
    from kv_b_proj as it is (bf16)."""
    kv = _fp8_kv_b(mla)
    if kv is not None:
        from hetero.gpu.mla_absorb import uk_fp8  # triton: imported where it runs

        return uk_fp8(q_nope, kv.weight, kv.weight_scale_inv, kv.block, mla.nope_dim, mla.v_dim)
    return torch.einsum("thd,hdc->thc", q_nope, mla.wkv_b()[0])


def _o_from_latent(mla: MLA, out: torch.Tensor) -> torch.Tensor:
    """out_lat [T, h, kv_rank] -> [T, h, v] = out_lat W_UV^T per head, W_UV as in _q_latent."""
    kv = _fp8_kv_b(mla)
    if kv is not None:
        from hetero.gpu.mla_absorb import uv_fp8

        return uv_fp8(out, kv.weight, kv.weight_scale_inv, kv.block, mla.nope_dim, mla.v_dim)
    w_uv = mla.wkv_b()[1]  # [h, v, c]
    # written straight into [T, h, v] (the einsum's [h, T, v] result took a copy a layer for
    # o_proj's flatten at batch > 1: cuBLAS writes the strided rows itself)
    o = torch.empty(*out.shape[:2], w_uv.shape[1], device=out.device, dtype=out.dtype)
    torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2), out=o.transpose(0, 1))
    return o


def mha_sequence(mla: MLA, q_nope, q_pe, latent, k_pe) -> torch.Tensor:
    """One sequence's extend step in the decompressed form: its q_len new tokens (the last of
    its S context tokens, already in the cache) over K = [W_UK latent, k_pe] and V = W_UV
    latent, causal aligned bottom-right, through `scaled_dot_product_attention` (flash
    attention on the GPU; V zero-padded to the query's width, which flash wants).
    q_nope [q, h, nope], q_pe [q, h, r], latent [S, c], k_pe [S, r] -> [q, h, v]."""
    w_uk, w_uv = mla.wkv_b()
    dtype, (S, h) = q_nope.dtype, (latent.shape[0], mla.n_heads)
    q_len, qk = q_nope.shape[0], mla.nope_dim + mla.rope_dim
    lat = latent.to(dtype)
    k_pe = k_pe.to(dtype)[None].expand(h, S, mla.rope_dim)
    k = torch.cat([torch.einsum("sc,hdc->hsd", lat, w_uk), k_pe], dim=-1)  # [h, S, qk]
    v = F.pad(torch.einsum("sc,hdc->hsd", lat, w_uv), (0, qk - mla.v_dim))  # [h, S, qk]
    q = torch.cat([q_nope, q_pe.to(dtype)], dim=-1).transpose(0, 1)  # [h, q, qk]
    mask = None if q_len == S else causal_lower_right(q_len, S)
    causal, scale = q_len == S, mla.softmax_scale
    with sdpa_kernel(FLASH if q.is_cuda else [SDPBackend.MATH]):
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], mask, 0.0, causal,
                                           scale=scale)  # fmt: skip
    return o[0, :, :, : mla.v_dim].transpose(0, 1)  # [q, h, v]


def _decode_latent(mla: MLA, q_lat, q_pe, batch: ForwardBatch, cache: Cache) -> torch.Tensor:
    """One new token a sequence: every sequence at once over the longest context, the rest of
    each row masked, instead of a loop of small ops per sequence. q_lat [B, h, c] -> [B, h, c]."""
    S = max(batch.ctx_lens)
    latent, k_pe = cache.gather(mla.layer, batch, S)  # [B, S, c], [B, S, r]
    latent, k_pe = latent.to(q_lat.dtype), k_pe.to(q_lat.dtype)
    scores = torch.einsum("bhc,bsc->bhs", q_lat, latent)
    scores += torch.einsum("bhr,bsr->bhs", q_pe, k_pe)
    future = torch.arange(S, device=q_lat.device)[None, :] > batch.positions[:, None]  # [B, S]
    probs = _softmax(scores * mla.softmax_scale, future)
    return torch.einsum("bhs,bsc->bhc", probs, latent)


def _softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scores [q, h, ctx], mask [q, ctx] True where a key lies in the future."""
    scores = scores.masked_fill(mask[:, None, :], float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
