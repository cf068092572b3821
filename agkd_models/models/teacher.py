"""The AGKD hybrid teacher: a CNN branch (VGG19 by default) and a ViT branch (ViT-B/16 by
default), each with ``num_classes`` outputs, concatenated and mapped by one linear layer
to the teacher's logits; plus the teacher attention map ``A_T = Combine(A_CNN, A_ViT)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import timm
import torch
from torch import nn

import agkd_ops
from .attention import ViTAttentionRecorder, attention_rollout, cls_attention, combine_attention

__all__ = ["HybridTeacher", "TeacherOutput", "WeightsFileError", "create_timm_model"]


class WeightsFileError(ValueError):
    """A local weights file that timm cannot load into the model it is given for."""


def create_timm_model(name: str, num_classes: int, *, pretrained: bool = False,
                      weights: Optional[str] = None, weights_setting: str = "weights", **kwargs: Any) -> nn.Module:
    """A timm model by name. ``weights``: a local checkpoint file loaded through timm's
    pretrained machinery (``pretrained_cfg_overlay=dict(file=...)``, classifier adapted to
    ``num_classes``); nothing is downloaded unless ``pretrained=True`` without ``weights``.
    A file timm cannot load into the model is a WeightsFileError naming ``weights_setting``."""
    if weights is None:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    # timm loads a file non-strictly (it drops a classifier of another size) and only logs
    # the keys that did not fit: those are read back from its log, so that a file of
    # another model is refused instead of leaving the model at its random initialisation.
    log = logging.getLogger("timm.models._builder")
    handler = _KeysNotLoaded()
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.INFO)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
    except Exception as exc:  # unpickling, misshapen keys, not a checkpoint at all, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsFileError(f"{weights_setting}={weights}: timm could not load it into {name!r} "
                               f"({reason[:200]})") from None
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)
    classifier = model.pretrained_cfg.get("classifier") or ()
    heads = {f"{c}.{p}" for c in ((classifier,) if isinstance(classifier, str) else classifier) for p in ("weight", "bias")}
    missing = [k for k in handler.missing if k not in heads]
    if missing or handler.unexpected:
        raise WeightsFileError(f"{weights_setting}={weights}: timm could not load it into {name!r}: "
                               f"{len(missing)} of its weights are not in the file (e.g. {missing[:2]}), "
                               f"{len(handler.unexpected)} in the file are not the model's "
                               f"(e.g. {handler.unexpected[:2]})")
    return model


class _KeysNotLoaded(logging.Handler):
    """Collects the keys timm's non-strict load reports as missing or unexpected."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: list = []
        self.unexpected: list = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for prefix, keys in (("Missing keys (", self.missing), ("Unexpected keys (", self.unexpected)):
            if message.startswith(prefix):
                keys += message[len(prefix):].split(")", 1)[0].split(", ")


@dataclass
class TeacherOutput:
    logits: torch.Tensor              # (B, K) fused teacher logits z_T
    attention: torch.Tensor           # (B, 1 or 2, H, W) A_T
    cnn_logits: torch.Tensor          # (B, K)
    vit_logits: torch.Tensor          # (B, K)
    cnn_attention: torch.Tensor       # (B, 1, h, w) attention transfer of the last conv map
    vit_attention: torch.Tensor       # (B, 1, gh, gw) CLS attention or rollout
    cnn_features: torch.Tensor        # (B, C, h, w) last convolutional feature map
    tokens: torch.Tensor              # (B, T, D) last-block tokens (prefix tokens first)
    qkv: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # last block's q, k, v: (B, heads, T, hd)
    num_prefix_tokens: int
    grid: Tuple[int, int]             # ViT patch grid (gh, gw)


class HybridTeacher(nn.Module):
    """CNN + ViT teacher (AGKD, Fig. 1): ``z_T = W [z_CNN ; z_ViT] + b``.

    Args:
        num_classes: classes ``d`` of each branch and of the fused output.
        cnn, vit: timm model names (``"vgg19"``, ``"vit_base_patch16_224"`` by default;
            e.g. ``"vgg11"`` and ``"vit_tiny_patch16_224"`` for tests).
        cnn_weights, vit_weights: local checkpoint files for the branches.
        pretrained: let timm fetch its pretrained weights (needs a network).
        vit_kwargs, cnn_kwargs: extra ``timm.create_model`` arguments of each branch (ViT:
            ``img_size``, ``patch_size``, ...; VGG: ``mlp_ratio`` shrinks its 4096-wide head).
        vit_attention: ``"cls"`` (last block's CLS attention, head mean) or ``"rollout"``.
        combine: ``"add"`` (normalised sum, one channel) or ``"concat"`` (two channels).
        attention_size: resolution of ``A_T`` (default: the larger branch map).
        p: exponent of the CNN attention map.
    """

    def __init__(self, num_classes: int, *, cnn: str = "vgg19", vit: str = "vit_base_patch16_224",
                 cnn_weights: Optional[str] = None, vit_weights: Optional[str] = None,
                 pretrained: bool = False, vit_kwargs: Optional[Dict[str, Any]] = None,
                 cnn_kwargs: Optional[Dict[str, Any]] = None,
                 vit_attention: str = "cls", combine: str = "add",
                 attention_size: Optional[Tuple[int, int]] = None, p: float = 2.0):
        super().__init__()
        if vit_attention not in ("cls", "rollout"):
            raise ValueError(f"HybridTeacher: vit_attention must be 'cls' or 'rollout', got {vit_attention!r}")
        if combine not in ("add", "concat"):
            raise ValueError(f"HybridTeacher: combine must be 'add' or 'concat', got {combine!r}")
        self.cnn = create_timm_model(cnn, num_classes, pretrained=pretrained, weights=cnn_weights,
                                     weights_setting="teacher.cnn_weights", **(cnn_kwargs or {}))
        self.vit = create_timm_model(vit, num_classes, pretrained=pretrained, weights=vit_weights,
                                     weights_setting="teacher.vit_weights", **(vit_kwargs or {}))
        self.fuse = nn.Linear(2 * num_classes, num_classes)
        self.vit_attention, self.combine, self.p = vit_attention, combine, p
        self.attention_size = tuple(attention_size) if attention_size is not None else None
        blocks = range(len(self.vit.blocks)) if vit_attention == "rollout" else [len(self.vit.blocks) - 1]
        self._recorder = ViTAttentionRecorder(self.vit, list(blocks))

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        self._recorder.clear()
        cnn_features = self.cnn.forward_features(images)
        cnn_logits = self.cnn.forward_head(cnn_features)
        tokens = self.vit.forward_features(images)
        vit_logits = self.vit.forward_head(tokens)
        logits = self.fuse(torch.cat([cnn_logits, vit_logits], dim=1))

        prefix = self.vit.num_prefix_tokens
        grid = tuple(self.vit.patch_embed.grid_size)
        records = self._recorder.records
        last = records[len(self.vit.blocks) - 1]
        if self.vit_attention == "cls":
            vit_map = cls_attention(last["attn"], prefix, grid)
        else:
            vit_map = attention_rollout([records[i]["attn"] for i in sorted(records)], prefix, grid)
        cnn_map = agkd_ops.attention_map(cnn_features.float(), p=self.p)
        attention = combine_attention(cnn_map, vit_map.to(cnn_map.dtype), self.combine, self.attention_size)
        return TeacherOutput(logits=logits, attention=attention, cnn_logits=cnn_logits,
                             vit_logits=vit_logits, cnn_attention=cnn_map, vit_attention=vit_map,
                             cnn_features=cnn_features, tokens=tokens,
                             qkv=(last["q"], last["k"], last["v"]), num_prefix_tokens=prefix, grid=grid)
