"""Attention maps of the two teacher branches and of the student.

* CNN branch and student stages: attention transfer, ``agkd_ops.attention_map`` of a
  feature map (mean over channels of ``|F|^p``, L2-normalised per sample).
* ViT branch: the attention over patches, recomputed as ``softmax(q kᵀ · scale)`` from a
  forward hook on the block's ``attn.qkv`` projection, so timm's fused attention stays on
  for the model's own forward (the fused kernel never materialises the softmax). Either
  the CLS token's attention in the last block averaged over heads, or attention rollout
  (Abnar & Zuidema) over all blocks.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import agkd_ops

__all__ = ["ViTAttentionRecorder", "cls_attention", "attention_rollout", "combine_attention",
           "minmax_normalize"]


class ViTAttentionRecorder:
    """Records, for chosen blocks of a timm ``VisionTransformer``, the attention
    probabilities ``softmax(q kᵀ · scale)`` (B, heads, T, T) and the block's q, k, v
    (B, heads, T, head_dim), from a hook on ``block.attn.qkv``. The model's forward runs
    unchanged (fused attention included); the recomputation costs one extra ``q kᵀ`` per
    recorded block."""

    def __init__(self, vit: nn.Module, blocks: Sequence[int]):
        self.records: Dict[int, Dict[str, torch.Tensor]] = {}
        self._handles = []
        for index in blocks:
            attn = vit.blocks[index].attn
            self._handles.append(attn.qkv.register_forward_hook(self._hook(index, attn)))

    def _hook(self, index: int, attn: nn.Module):
        def hook(_module, _inputs, qkv: torch.Tensor):
            b, t, _ = qkv.shape
            heads = attn.num_heads
            q, k, v = qkv.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)  # identities unless the model uses qk-norm
            probs = (q * attn.scale) @ k.transpose(-2, -1)
            self.records[index] = {"attn": probs.float().softmax(dim=-1), "q": q, "k": k, "v": v}
        return hook

    def clear(self) -> None:
        self.records.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def cls_attention(attn: torch.Tensor, num_prefix_tokens: int, grid: Tuple[int, int]) -> torch.Tensor:
    """The CLS token's attention to the patches, averaged over heads: (B, 1, gh, gw)."""
    cls_to_patches = attn[:, :, 0, num_prefix_tokens:].mean(dim=1)
    return cls_to_patches.reshape(attn.shape[0], 1, *grid)


def attention_rollout(attns: List[torch.Tensor], num_prefix_tokens: int,
                      grid: Tuple[int, int]) -> torch.Tensor:
    """Attention rollout: the product over blocks of (head-mean attention + identity),
    rows renormalised; the CLS row's patch columns as a (B, 1, gh, gw) map."""
    rollout = None
    for attn in attns:
        a = attn.mean(dim=1)
        a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    cls_to_patches = rollout[:, 0, num_prefix_tokens:]
    return cls_to_patches.reshape(rollout.shape[0], 1, *grid)


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale every (sample, channel) map to [0, 1]: ``agkd_ops.minmax_scale`` (fused; a map
    whose range is at most ``eps`` becomes 0 with a zero gradient), or its reference for
    another ``eps``."""
    if eps == 1e-12:
        return agkd_ops.minmax_scale(maps)
    return agkd_ops.reference.minmax_scale(maps, eps=eps)


def combine_attention(a_cnn: torch.Tensor, a_vit: torch.Tensor, mode: str = "add",
                      size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``Combine(A_CNN, A_ViT)``: both maps resized bilinearly to ``size`` (default: the
    larger of the two), each L2-normalised per sample, then

    * ``"add"``: their sum, L2-normalised again — (B, 1, H, W);
    * ``"concat"``: stacked as two channels — (B, 2, H, W).
    """
    if mode not in ("add", "concat"):
        raise ValueError(f"combine_attention: mode must be 'add' or 'concat', got {mode!r}")
    if size is None:
        size = max(tuple(a_cnn.shape[-2:]), tuple(a_vit.shape[-2:]))
    maps = []
    for a in (a_cnn, a_vit):
        if tuple(a.shape[-2:]) != tuple(size):
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        maps.append(F.normalize(a.flatten(1), dim=1).view_as(a))
    if mode == "concat":
        return torch.cat(maps, dim=1)
    total = maps[0] + maps[1]
    return F.normalize(total.flatten(1), dim=1).view_as(total)
