"""Attention kernels shared by the LLM and super-resolution: `scaled_dot_product_attention` with a dense boolean mask,
or FlexAttention (`torch.nn.attention.flex_attention`) with a block-sparse `BlockMask`.

A dense mask (B, 1, T, S) rules out FlashAttention on CUDA and is materialized for every batch; a `BlockMask` records
which (128 x 128)-token blocks are empty, full or partial, so the kernel skips empty blocks and evaluates the mask
function only inside partial ones. Both paths compute the same attention (tests hold FlexAttention to SDPA).

FlexAttention is compiled (once per process, on first use) on CUDA, where compilation generates its fused kernel.
Elsewhere it runs eagerly, an unfused reference that materializes the scores: PyTorch has no compiled FlexAttention
backward on CPU (and its eager CPU backward is switched off), so the flex path on CPU serves forward passes and
tests; models pick SDPA there unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

Backend = Literal["auto", "sdpa", "flex"]
BACKENDS = ("auto", "sdpa", "flex")

# A dense boolean mask (True = attend), broadcastable to (B, H, T, S); a BlockMask; or None (attend everywhere).
Mask = Tensor | BlockMask | None
# FlexAttention's mask_mod(b, h, q, k): True where query q of sample b (head h) may attend key k
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

_compiled: dict[str, Callable] = {}


def check_backend(owner: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{owner}.attention must be one of {list(BACKENDS)}, got {backend!r}")


def uses_flex(backend: Backend, device: torch.device) -> bool:
    """"auto" takes FlexAttention on CUDA and SDPA elsewhere."""
    return backend == "flex" or (backend == "auto" and device.type == "cuda")


def _on_cuda(name: str, fn: Callable, device: torch.device) -> Callable:
    if device.type != "cuda":
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


def block_mask(mask_mod: MaskMod, batch: int | None, queries: int, keys: int, device: torch.device) -> BlockMask:
    """A BlockMask of mask_mod(b, h, q, k) -> bool, the same for every head; batch None: the same for every sample.
    On CUDA its construction is compiled too, so the dense (B, T, S) mask is never materialized."""
    return _on_cuda("create_block_mask", create_block_mask, device)(mask_mod, batch, None, queries, keys,
                                                                    device=device)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H, S, D) under a dense mask, a BlockMask or none."""
    if isinstance(mask, BlockMask):
        return _on_cuda("flex_attention", flex_attention, q.device)(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
