"""Attention for packed training rows: per-sample (varlen) kernels instead of a block-diagonal mask.

A packed row holds several samples with position ids restarting at 0. SDPA and eager attention need
an L x L block-diagonal mask and still compute every block of it (a 16k-token row of 3.6k-token
samples does ~5x the attention work of the samples alone); varlen kernels take the sample boundaries
(cu_seq_lens) and do only the per-sample work. Three of them:
  * flash_attention_2: the flash_attn package, through HF's own flash path;
  * torch_varlen: PyTorch's built-in FlashAttention-2 varlen (`torch.nn.attention.varlen`, CUDA,
    fp16/bf16), registered here as an HF attention implementation, so no extra package is needed;
  * sdpa_varlen: SDPA called once per sample (any device and dtype). On CPU, rows of 3 one-tile
    driving samples (2,115 tokens) train the tiny model 29% faster per step than with the masked call
    (`python benchmarks/train_throughput.py --sizes tiny --modes full --ablate attn --pack-tokens 2304
    --pack-tiles 8 --max-tiles 1 --workers 0`: rows "fast" vs "fast attn=sdpa").
`resolve_attn_implementation("auto")` picks flash_attention_2 or torch_varlen on a GPU with half
precision, sdpa_varlen on CPU, else SDPA. All get the boundaries from
`adapt.training.trainer.varlen_kwargs`, computed once per step. They are training implementations (no KV
cache): `adapt.training.trainer.train` switches the model to one for the run and back afterwards.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_flash_attention_utils import (
    _is_packed_sequence,
    prepare_fa_kwargs_from_position_ids,
)

from adapt.errors import AdaptError

TORCH_VARLEN = "torch_varlen"
SDPA_VARLEN = "sdpa_varlen"
TRAINING_ONLY = (TORCH_VARLEN, SDPA_VARLEN)  # no KV cache: a model generates with SDPA


def torch_varlen_available() -> bool:
    """PyTorch has the varlen kernels and a CUDA GPU of compute capability 8.0+ (flash) is there."""
    return (torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None
            and torch.cuda.get_device_capability() >= (8, 0))


def resolve_attn_implementation(name: str, half_precision: bool = True) -> str:
    """`auto` -> flash_attention_2 (flash_attn importable) or torch_varlen on a GPU training in
    bf16/fp16, sdpa_varlen on CPU, else sdpa (fp32 on a GPU: one masked kernel rather than a launch
    per sample); any other name is kept. All of them compute exact attention."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return SDPA_VARLEN
    if not half_precision:
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return TORCH_VARLEN if torch_varlen_available() else "sdpa"


def _boundaries(batch: int, length: int, attention_mask: torch.Tensor | None, kwargs: dict[str, Any],
                device: torch.device) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(cu_seq_lens int32, max length, flat mask of the real tokens or None) of a (batch, length) input."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"]), None
    if attention_mask is not None:  # 2D padding mask (flash-type mask functions pass it through)
        lengths = attention_mask.sum(-1, dtype=torch.int32)
        cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return cu, int(lengths.max()), attention_mask.bool().reshape(-1)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and _is_packed_sequence(position_ids, batch):
        (cu, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(position_ids)
        return cu, int(max_length), None
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device), length, None


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, *, kernel: Callable | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF attention-interface function over a varlen kernel with `torch.nn.attention.varlen.varlen_attn`'s
    signature. query/key/value: (batch, heads, length, head_dim); returns (batch, length, heads, head_dim)."""
    batch, _, length, _ = query.shape
    if key.shape[2] != length:
        raise AdaptError("varlen attention is for training (no KV cache)",
                         hint="generate with attn_implementation sdpa; adapt.training.trainer.train restores it after a run")
    if dropout:
        raise AdaptError("varlen attention has no dropout", hint="set attention_dropout to 0")
    out_dtype = value.dtype
    if kernel is None:  # PyTorch's flash kernels: CUDA, fp16/bf16 only
        from torch.nn.attention.varlen import varlen_attn as kernel

        if query.dtype not in (torch.float16, torch.bfloat16):  # e.g. fp32 after RoPE under autocast
            target = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
            query, key, value = (x.to(target) for x in (query, key, value))
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    cu, max_length, real = _boundaries(batch, length, attention_mask, kwargs, query.device)
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[3]) for x in (query, key, value))
    if real is not None:
        q, k, v = q[real], k[real], v[real]
    out = kernel(q, k, v, cu, cu, max_length, max_length, scale=scaling,
                 window_size=(-1, 0) if causal else (-1, -1), enable_gqa=k.shape[1] != q.shape[1])
    if real is not None:
        full = out.new_zeros(batch * length, *out.shape[1:])
        full[real] = out
        out = full
    return out.reshape(batch, length, *out.shape[1:]).to(out_dtype), None


def sdpa_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                  cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None = None,
                  window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False) -> torch.Tensor:
    """`varlen_attn`'s contract ((tokens, heads, head_dim), samples between the cu boundaries) computed
    by SDPA: one batched call when every sample has the same length (a vision tower's tiles), else one
    call per sample, so no L x L mask is built and no cross-sample block is computed."""
    bounds = cu_seq_q.tolist()
    lengths = {end - start for start, end in zip(bounds[:-1], bounds[1:])}
    causal = window_size == (-1, 0)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (n, len, heads, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale,
            enable_gqa=enable_gqa)
        return out.transpose(1, 2)

    if len(lengths) == 1:
        size = lengths.pop()
        return attend(*(x.reshape(-1, size, *x.shape[1:]) for x in (query, key, value))).reshape(query.shape)
    return torch.cat([attend(query[None, start:end], key[None, start:end], value[None, start:end])[0]
                      for start, end in zip(bounds[:-1], bounds[1:])])


AttentionInterface.register(TORCH_VARLEN, varlen_attention)
AttentionInterface.register(SDPA_VARLEN, functools.partial(varlen_attention, kernel=sdpa_segments))
for _name in (TORCH_VARLEN, SDPA_VARLEN):
    AttentionMaskInterface.register(_name, flash_attention_mask)  # no L x L mask: boundaries instead
