"""Deep mutual learning (Zhang et al., "Deep Mutual Learning", CVPR 2018): peers trained
together from scratch, each on the labels and on the others' predictions. No teacher
takes part: DML is what a practitioner runs when there is no strong teacher, or to see
how much of a teacher's help a cohort of students gives itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch
from torch import nn

import agkd_ops

from ..models.student import Student, StudentOutput
from ..models.teacher import create_timm_model
from ..settings import ConfigError, Settings, setting
from .base import Distiller, ModelFacts
from .logit import weighted_ce

__all__ = ["MutualLearning", "DMLSettings", "check_dml_settings", "mutual_learning_terms"]


@dataclass
class DMLSettings(Settings, section="dml"):
    """Each of the ``peers`` models minimises ``CE + kl_weight · mean_{j≠i} τ²·KL(p_j ‖ p_i)``,
    the other peers' softened predictions ``p_j`` taken as fixed targets (the paper's
    eq. 7; the KL fused in ``agkd_ops.kd_kl_div``). The first peer is the configured student,
    the others are built fresh (their own random initialisation) as ``peer_name`` (any timm
    classifier) or, by default, as the student's architecture. All peers take one joint step per batch from one
    optimizer, where the paper alternates their updates within a batch: every peer's
    targets are the others' predictions before that step, as in most implementations.
    Defaults: the paper's two peers, weight 1 and plain softmax (τ = 1)."""
    peers: int = setting(2, "models trained together, the student first (the paper's cohort size K)", minimum=2,
                         maximum=8)
    kl_weight: float = setting(1.0, "weight of the mean KL to the other peers' predictions", minimum=0)
    temperature: float = setting(1.0, "softmax temperature τ of the peers' predictions (τ² scales the KL)",
                                 above=0)
    peer_name: Optional[str] = setting(None, "timm name of the other peers, any timm classifier (null: the "
                                       "student's architecture)")


def check_dml_settings(settings: DMLSettings, facts: ModelFacts) -> None:
    """A ``peer_name`` must be a timm model (before any work)."""
    import timm

    if settings.peer_name is not None and not timm.is_model(settings.peer_name):
        raise ConfigError(f"dml.peer_name: {settings.peer_name!r} is not a timm model name")


def mutual_learning_terms(logits, targets: torch.Tensor, settings: DMLSettings,
                          label_smoothing: float = 0.0) -> Dict[str, torch.Tensor]:
    """The named terms of DML for the peers' ``logits`` (a sequence, the student's first):
    ``ce`` and ``kl`` of the student, ``peer<i>_ce`` and ``peer<i>_kl`` of the others, and
    their sum as ``total`` (each peer's gradient comes from its own two terms alone)."""
    detached = [z.detach() for z in logits]
    terms: Dict[str, torch.Tensor] = {}
    total = 0
    for i, z in enumerate(logits):
        ce = weighted_ce(1.0, z, targets, label_smoothing)
        kl = sum(agkd_ops.kd_kl_div(z, detached[j], temperature=settings.temperature)
                 for j in range(len(logits)) if j != i) / (len(logits) - 1)
        kl = settings.kl_weight * kl
        prefix = "" if i == 0 else f"peer{i}_"
        terms[prefix + "ce"], terms[prefix + "kl"] = ce, kl
        total = total + ce + kl
    terms["total"] = total
    return terms


class MutualLearning(Distiller):
    """DML (:class:`DMLSettings` has the loss and its defaults). The teacher is held, as by
    every distiller, but never run: a teacher cache has nothing to replay for it. The other
    peers are kept (:meth:`kept_models`): validated every epoch and saved beside the
    student."""

    settings_class = DMLSettings
    compiles_whole = False  # loss_terms runs the other peers: they are compiled as models instead

    def __init__(self, teacher, student: Student, settings=None, *, label_smoothing: float = 0.0, **changes):
        super().__init__(teacher, student, label_smoothing=label_smoothing)
        self.settings = settings = self.settings_from(settings, changes)
        # Plain timm classifiers: a peer needs only its logits, no stage taps.
        self.peers = nn.ModuleList(create_timm_model(settings.peer_name or student.name, student.model.num_classes)
                                   for _ in range(settings.peers - 1))

    def teacher_outputs(self, images: torch.Tensor):
        return None  # DML reads no teacher output: none is computed

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.student.parameters()
        yield from self.peers.parameters()

    def enable_compile(self, *, model: bool = True, loss: bool = True) -> None:
        if model:
            self.student.compile()
            for peer in self.peers:
                peer.compile()

    def kept_models(self) -> Dict[str, nn.Module]:
        return {f"peer{i}": peer for i, peer in enumerate(self.peers, start=1)}

    def loss_terms(self, s: StudentOutput, t, targets: torch.Tensor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = [s.logits] + [peer(images) for peer in self.peers]
        return mutual_learning_terms(logits, targets, self.settings, self.label_smoothing)
