"""Weighted transformed teacher matching (WTTM; Zheng & Yang, ICLR 2024): TTM with each
sample weighted by the power sum of the teacher's distribution."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import Settings, setting
from .logit import LogitMethod, weighted_ce
from .ttm import TTMTerm

__all__ = ["WTTM", "WTTMSettings", "WTTMTerm", "power_sum"]


@dataclass
class WTTMSettings(Settings, section="wttm"):
    """``ce_weight·CE + kd_weight·mean_n(U_γ(p_t,n)·KL(p_t,n^γ / U_γ ‖ softmax(s_n)))`` with
    ``U_γ(p) = Σ_k p_k^γ``, the normaliser of the power transform: it is larger where the
    teacher is less sure (at most K^(1−γ)), so those samples weigh more. Defaults: γ and
    the weight of the authors' WTTM example (``--add wttm --ttm_l 0.2 -a 4``, CIFAR-100)."""
    ce_weight: float = setting(1.0, "weight of the cross-entropy with the labels (the authors' -r)", minimum=0)
    kd_weight: float = setting(4.0, "weight of the sample-weighted KL (the authors' -a in their example)", minimum=0)
    gamma: float = setting(0.2, "γ, the exponent of the teacher's power transform (the authors' --ttm_l)",
                           minimum=1e-3, maximum=1e3)


def power_sum(teacher: torch.Tensor, gamma: float) -> torch.Tensor:
    """``Σ_k softmax(t)_k^γ`` per row, as ``exp(logsumexp(γ·t) − γ·logsumexp(t))`` (no
    probability underflows to 0 before its power is taken); no gradient (the teacher's)."""
    t = teacher.detach().float()
    return torch.exp(torch.logsumexp(gamma * t, dim=1) - gamma * torch.logsumexp(t, dim=1))


class WTTMTerm(TTMTerm):
    settings_class = WTTMSettings

    def __call__(self, student, teacher, targets):
        s = self.settings
        ce = weighted_ce(s.ce_weight, student, targets, self.label_smoothing)
        per_sample = self.transformed_kl(student, teacher, "none")
        wttm = s.kd_weight * (power_sum(teacher, s.gamma) * per_sample).mean()
        return {"ce": ce, "wttm": wttm, "total": ce + wttm}


class WTTM(LogitMethod):
    """Weighted transformed teacher matching (:class:`WTTMSettings` has the loss)."""

    settings_class = WTTMSettings
    term_class = WTTMTerm
