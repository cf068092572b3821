"""Cross-architecture KD (Liu et al., ACCV 2022): a CNN student learns from a ViT teacher
through two projectors of one stage's feature map, with a multi-view adversarial game for
robustness. Projectors, generator and discriminator are training-only: the student alone
is what is kept for inference.

Where the paper is silent or disagrees with its authors' released code, :class:`CAKD` says
which it follows and why."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..engine.distributed import average_gradients
from ..engine.task import TaskOutput
from ..models.student import Student, StudentOutput
from ..models.teacher import HybridTeacher, TeacherOutput
from ..settings import ConfigError, Settings, setting
from .base import Distiller, ModelFacts

__all__ = ["PCAProjector", "GLProjector", "MultiViewGenerator", "MultiViewDiscriminator", "CAKD", "CAKDSettings",
           "pca_loss", "match_teacher_grid", "PCA_ATTENTION", "VIEW_TERMS"]

QKV = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _to_grid(features: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    if tuple(features.shape[-2:]) == tuple(grid):
        return features
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


class PCAProjector(nn.Module):
    """Partially cross-attention projector: three 3×3 convolutions map the student's
    feature map, resized to the teacher's patch grid, to Q_S, K_S, V_S of the teacher's
    token width, split into the teacher's heads (B, heads, N, head_dim).

    In training, the teacher's Q/K/V stand in for the student's with probability
    ``replace_prob`` (Eq. 3): element by element (the paper's M ⊙ Q_T + (1 − M) ⊙ Q_S), or
    whole tensors at once when ``elementwise=False``."""

    def __init__(self, in_channels: int, dim: int, heads: int, grid: Tuple[int, int],
                 replace_prob: float = 0.5, elementwise: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"PCAProjector: dim {dim} is not divisible by heads {heads}")
        self.q, self.k, self.v = (nn.Conv2d(in_channels, dim, 3, padding=1) for _ in range(3))
        self.heads, self.grid = heads, tuple(grid)
        self.replace_prob, self.elementwise = replace_prob, elementwise

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, d = x.shape[:2]
        return x.flatten(2).transpose(1, 2).reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)

    def _replace(self, mine: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        teacher = teacher.to(mine.dtype)
        if self.elementwise:
            return torch.where(torch.rand_like(mine) < self.replace_prob, teacher, mine)
        return teacher if bool(torch.rand(()) < self.replace_prob) else mine

    def forward(self, features: torch.Tensor, teacher_qkv: Optional[QKV] = None) -> QKV:
        x = _to_grid(features, self.grid)
        qkv = tuple(self._split(conv(x)) for conv in (self.q, self.k, self.v))
        if self.training and teacher_qkv is not None and self.replace_prob > 0:
            qkv = tuple(self._replace(mine, theirs) for mine, theirs in zip(qkv, teacher_qkv))
        return qkv


PCA_ATTENTION = ("logits", "probabilities")


def pca_loss(student_qkv: QKV, teacher_qkv: QKV, *, attention: str = "logits", attention_weight: float = 0.2,
             value_weight: float = 0.05) -> torch.Tensor:
    """The PCA projector's loss, ``attention_weight·‖A_T − A_S‖² + value_weight·‖R_T − R_S‖²``
    (mean squared errors) with ``R = V·Vᵀ/√d``, per head, and the attention compared as

    - ``"probabilities"``: per head ``softmax(Q·Kᵀ/√d)`` — the paper's Eq. 4 (weights 1, 1);
    - ``"logits"``: ``Q·Kᵀ/√d`` before the softmax, averaged over heads — the authors'
      code (weights 0.2, 0.05). Over N tokens a softmax row's entries are about 1/N, so
      their squared error is tiny at any N worth the name and the term carries no signal;
      the logits keep it.

    Shapes: each of Q, K, V is (B, heads, N, d)."""
    if attention not in PCA_ATTENTION:
        raise ValueError(f"pca_loss: attention must be one of {', '.join(PCA_ATTENTION)}, got {attention!r}")
    (qs, ks, vs), (qt, kt, vt) = student_qkv, teacher_qkv
    scale = 1.0 / math.sqrt(qs.shape[-1])

    def attention_of(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = q @ k.transpose(-2, -1) * scale
        return scores.mean(dim=1) if attention == "logits" else scores.softmax(dim=-1)

    def relation(v: torch.Tensor) -> torch.Tensor:
        return v @ v.transpose(-2, -1) * scale

    return (attention_weight * F.mse_loss(attention_of(qs, ks), attention_of(qt, kt))
            + value_weight * F.mse_loss(relation(vs), relation(vt)))


class GLProjector(nn.Module):
    """Group-wise linear projector: the teacher's patch grid is split into a 4×4 layout of
    neighbourhoods; the positions of one neighbourhood share one linear layer (16 layers)
    from the student's channels to the teacher's token width; dropout on the output."""

    def __init__(self, in_channels: int, dim: int, grid: Tuple[int, int], groups: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        gh, gw = grid
        self.grid = (gh, gw)
        self.layers = nn.ModuleList(nn.Linear(in_channels, dim) for _ in range(groups * groups))
        rows = torch.arange(gh).mul(groups).div(gh, rounding_mode="floor")
        cols = torch.arange(gw).mul(groups).div(gw, rounding_mode="floor")
        self.register_buffer("group_of", (rows[:, None] * groups + cols[None, :]).flatten(), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = _to_grid(features, self.grid).flatten(2).transpose(1, 2)  # (B, N, C)
        out = tokens.new_zeros(tokens.shape[0], tokens.shape[1], self.layers[0].out_features)
        for g, layer in enumerate(self.layers):
            index = (self.group_of == g).nonzero(as_tuple=True)[0]
            if index.numel():
                out[:, index] = layer(tokens[:, index])
        return self.dropout(out)


class MultiViewGenerator(nn.Module):
    """Views of the student's input for CAKD's adversarial game (Sec. 3.3): colour jitter,
    random crop (resized back), rotation and patch masking, each applied with probability
    ``p`` (one draw per batch and transformation; parameters drawn per sample where cheap).

    The images arrive normalised (``(pixel − mean) / std``, by default ImageNet's, which
    agkd_models' data sets apply); the views are made in pixel space and normalised again, so that a rotation's corners and a masked patch are black
    and jittered colours stay within [0, 1], whatever the normalisation."""

    def __init__(self, p: float = 0.5, jitter: float = 0.4, crop_scale: float = 0.7,
                 degrees: float = 30.0, mask_ratio: float = 0.25, mask_patch: int = 4,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        super().__init__()
        self.p, self.jitter, self.crop_scale = p, jitter, crop_scale
        self.degrees, self.mask_ratio, self.mask_patch = degrees, mask_ratio, mask_patch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.p == 0:
            return images
        mean, std = self.mean.to(images.dtype), self.std.to(images.dtype)
        x = images * std + mean  # pixels in [0, 1]
        b, _, h, w = x.shape
        coin = lambda: bool(torch.rand(()) < self.p)
        if coin():  # brightness and contrast per sample
            gain = 1 + self.jitter * (2 * torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 1)
            shift = self.jitter * (2 * torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 1) * 0.5
            centre = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - centre) * gain + centre + shift).clamp(0, 1)
        if coin():  # random crop, resized back
            ch, cw = max(1, int(h * self.crop_scale)), max(1, int(w * self.crop_scale))
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            x = F.interpolate(x[:, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                              align_corners=False)
        if coin():  # rotation per sample; what comes in from outside the image is black
            angle = (2 * torch.rand(b, device=x.device) - 1) * math.radians(self.degrees)
            cos, sin = angle.cos(), angle.sin()
            theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                                 torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
            grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
        if coin():  # black patches per sample
            ph, pw = -(-h // self.mask_patch), -(-w // self.mask_patch)
            keep = (torch.rand(b, 1, ph, pw, device=x.device) >= self.mask_ratio).to(x.dtype)
            x = x * F.interpolate(keep, size=(ph * self.mask_patch, pw * self.mask_patch), mode="nearest")[..., :h, :w]
        return (x - mean) / std


class MultiViewDiscriminator(nn.Module):
    """Three fully connected layers: token-mean features -> a real/fake logit."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


VIEW_TERMS = ("adversarial", "all")


def match_teacher_grid(grids: Sequence[Tuple[int, int]], teacher_grid: Tuple[int, int]) -> int:
    """The student stage CAKD projects by default: the deepest whose feature map has the
    teacher's token grid (the paper's stride-16 stage for a ViT-B/16 at 224 px), else the
    deepest at least as fine as the teacher's grid (resized down to it), else the finest."""
    th, tw = teacher_grid
    exact = [i for i, g in enumerate(grids) if tuple(g) == (th, tw)]
    if exact:
        return exact[-1]
    finer = [i for i, (h, w) in enumerate(grids) if h >= th and w >= tw]
    if finer:
        return finer[-1]
    return max(range(len(grids)), key=lambda i: (grids[i][0] * grids[i][1], -i))


@contextmanager
def _running_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """Batch normalisation normalises with the batch's statistics (as in training) but
    leaves its running statistics alone: the multi-view pass must not teach the student's
    BatchNorm the statistics of distorted images that evaluation never sees."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@dataclass
class CAKDSettings(Settings, section="cakd"):
    """CAKD's knobs: ``w(t)·(L_proj1 + L_proj2 + adversarial_weight·L_MVG) + ce_weight·CE``
    (see :class:`CAKD` for where each follows the paper or its authors' code)."""
    projected_stage: Optional[int] = setting(None, "student stage the projectors read (null: the deepest whose "
                                             "grid equals the teacher's token grid)", minimum=0)
    pca_attention: str = setting("logits", "PCA loss compares attention logits Q·Kᵀ/√d averaged over heads "
                                 "(authors' code) or per-head softmax probabilities (paper, Eq. 4)",
                                 choices=PCA_ATTENTION)
    pca_attention_weight: float = setting(0.2, "weight of the PCA loss's attention term", minimum=0)
    pca_value_weight: float = setting(0.05, "weight of the PCA loss's V·Vᵀ/√d term", minimum=0)
    replace_prob: float = setting(0.5, "probability of replacing the student's Q/K/V by the teacher's",
                                  minimum=0, maximum=1)
    replace_elementwise: bool = setting(True, "replace Q/K/V element by element (paper, Eq. 3), else whole "
                                        "tensors")
    adversarial_weight: float = setting(1.0, "weight λ of the multi-view adversarial term L_MVG", minimum=0)
    ce_weight: float = setting(1.0, "weight of the cross-entropy with the labels", minimum=0)
    distill_weight: float = setting(0.2, "weight w of the distillation terms once ramped in", minimum=0)
    ce_only_epochs: float = setting(1.0, "epochs of cross-entropy alone before the distillation terms", minimum=0)
    ramp_epochs: float = setting(2.0, "epochs over which w rises linearly from 0 (0: at once)", minimum=0)
    view_terms: str = setting("adversarial", "which terms see the multi-view samples (adversarial: that term "
                              "alone, as in Eq. 7; all: every term)", choices=VIEW_TERMS)
    discriminator_every: int = setting(1, "discriminator update period (iterations)", minimum=1)
    discriminator_lr: float = setting(1e-4, "the discriminator's Adam learning rate", above=0)
    dropout: float = setting(0.1, "dropout of the group-wise linear projector", minimum=0, below=1)
    view_prob: float = setting(0.5, "probability of each multi-view transform", minimum=0, maximum=1)

    renamed = {"lam": "adversarial_weight"}


def check_cakd_settings(settings: CAKDSettings, facts: ModelFacts) -> None:
    """The projected stage must be one of the chosen student's (before any work)."""
    stage = settings.projected_stage
    if stage is not None and not 0 <= stage < facts.student_stages:
        raise ConfigError(f"cakd.projected_stage: stage {stage} does not exist in {facts.student!r}, which has "
                          f"{facts.student_stages} stages (0 to {facts.student_stages - 1})")


class CAKD(Distiller):
    """Cross-architecture KD (Liu et al., "Cross-Architecture Knowledge Distillation",
    ACCV 2022). For the student (and projectors) the loss is

        w(t) · (L_proj1 + L_proj2 + adversarial_weight · L_MVG) + ce_weight · CE

    and the discriminator minimises ``L_MAD`` with its own optimizer, once every
    ``discriminator_every`` training iterations: an extra step the task declares
    (:meth:`extra_optimizers`, :meth:`extra_step`), taken by the trainer after the main
    step, from the detached tokens the loss path returns (``extra_inputs``).

    - ``L_proj1`` (Sec. 3.2, Eq. 3–4): :func:`pca_loss` between the PCA projector's Q/K/V
      and the teacher ViT's last-block Q/K/V (patch tokens), in the form ``pca_attention``
      with ``pca_attention_weight`` and ``pca_value_weight``. The paper compares softmax
      attention with weights 1 and 1; its authors' code compares the pre-softmax logits,
      averaged over heads, with weights 0.2 and 0.05, which is the default here because the
      softmax form carries no signal over many tokens (see :func:`pca_loss`). The paper's
      element-wise random replacement (Eq. 3) is kept (``replace_prob``), the code has none.
    - ``L_proj2`` (Eq. 5–6): mean squared distance between the GL projector's tokens and the
      teacher's last-block patch tokens.
    - ``L_MVG`` / ``L_MAD`` (Sec. 3.3, Eq. 7–9): the student's GL projection of a multi-view
      of the input should look real to the discriminator, which tells teacher tokens (real)
      from those projections (fake). Eq. 7 feeds the transformed samples to the adversarial
      term only; with ``view_terms="adversarial"`` (default) the cross-entropy and projector
      terms see the clean image the teacher sees, and the multi-view pass is a second
      student forward that leaves BatchNorm's running statistics alone. ``"all"`` feeds the
      views to every term.
    - ``CE``: Eq. 10 has no cross-entropy term; the authors' code keeps it at weight 1.
    - ``w(t)``: the authors' code trains on cross-entropy alone first, then ramps the
      distillation terms in; the paper is silent. ``w`` is 0 for ``ce_only_epochs``, then
      rises linearly over ``ramp_epochs`` (per iteration) to ``distill_weight``.
    - The projected stage (``projected_stage``; default :func:`match_teacher_grid`) is the
      student stage whose feature grid equals the teacher's token grid, as in the paper
      (the stride-16 stage against ViT-B/16 at 224 px).

    Projectors, generator and discriminator are training-only: the student alone is kept
    for inference. Settings: a :class:`CAKDSettings`, or its fields as keywords.
    """

    settings_class = CAKDSettings
    extra_inputs = ("fake", "real")
    # The loss path is the whole forward (multi-view generator, projectors): only the
    # student is compiled.
    compiles_whole = False
    # Under DDP: the discriminator steps itself and averages its own gradients over the
    # ranks; with whole-tensor replacement the PCA projector's convolutions go unused when
    # the teacher's Q/K/V replace them.
    ddp_self_synced = ("discriminator",)
    ddp_find_unused_parameters = True

    def __init__(self, teacher: HybridTeacher, student: Student, settings: Optional[CAKDSettings] = None, *,
                 label_smoothing: float = 0.0, **changes):
        super().__init__(teacher, student, label_smoothing=label_smoothing)
        self.settings = settings = self.settings_from(settings, changes)
        vit = teacher.vit
        dim, heads = vit.embed_dim, vit.blocks[-1].attn.num_heads
        grid = tuple(vit.patch_embed.grid_size)
        stage = settings.projected_stage
        if stage is None:
            stage = match_teacher_grid(student.stage_grids(tuple(vit.patch_embed.img_size)), grid)
        student.tap(stage)
        self.projected_stage = stage
        channels = student.stage_channels(stage)
        self.pca = PCAProjector(channels, dim, heads, grid, settings.replace_prob, settings.replace_elementwise)
        self.gl = GLProjector(channels, dim, grid, dropout=settings.dropout)
        self.generator = MultiViewGenerator(settings.view_prob)
        self.discriminator = MultiViewDiscriminator(dim)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(),
                                                        lr=settings.discriminator_lr, betas=(0.5, 0.999))
        self.iterations = 0
        self.discriminator_steps = 0
        self._epoch, self._batches, self._batch = 0, 1, 0

    def get_extra_state(self):
        # Saved with state_dict, so a resumed run keeps the discriminator's schedule.
        return {"iterations": self.iterations, "discriminator_steps": self.discriminator_steps}

    def set_extra_state(self, state):
        self.iterations = int(state["iterations"])
        self.discriminator_steps = int(state["discriminator_steps"])

    def start_epoch(self, epoch: int, batches: int) -> None:
        self._epoch, self._batches, self._batch = epoch, max(1, batches), 0

    def distillation_weight(self) -> float:
        """``w(t)`` at the current training iteration, ``t`` in epochs."""
        settings = self.settings
        t = self._epoch + self._batch / self._batches
        if t < settings.ce_only_epochs:
            return 0.0
        if settings.ramp_epochs <= 0:
            return settings.distill_weight
        return settings.distill_weight * min(1.0, (t - settings.ce_only_epochs) / settings.ramp_epochs)

    def trainable_parameters(self):
        """Student and projectors: what the main optimizer updates (not the discriminator)."""
        for module in (self.student, self.pca, self.gl):
            yield from module.parameters()

    def extra_optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.discriminator_optimizer]

    def extra_step(self, output: TaskOutput) -> Dict[str, torch.Tensor]:
        """Every ``discriminator_every`` training iterations that had an adversarial term,
        one step of the discriminator on ``L_MAD``: teacher tokens real, the student's
        projections (of this step) fake."""
        if not output.extra or "fake" not in output.extra:
            return {}  # no adversarial term this step (cross-entropy alone)
        self.iterations += 1
        if self.iterations % self.settings.discriminator_every:
            return {}
        fake, real = output.extra["fake"], output.extra["real"]
        with torch.enable_grad():
            d_real, d_fake = self.discriminator(real), self.discriminator(fake)
            mad = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                   + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
            self.discriminator_optimizer.zero_grad(set_to_none=True)  # drops L_MVG's gradients too
            mad.backward()
            average_gradients(self.discriminator.parameters())
            self.discriminator_optimizer.step()
        self.discriminator_steps += 1
        return {"mad": mad.detach()}

    def _adversarial(self, tokens: torch.Tensor) -> torch.Tensor:
        d_fake = self.discriminator(tokens.mean(1))
        return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))

    def _views_everywhere(self) -> bool:
        return self.training and self.settings.view_terms == "all"

    def student_inputs(self, images: torch.Tensor) -> torch.Tensor:
        return self.generator(images) if self._views_everywhere() else images

    def loss_terms(self, s: StudentOutput, t: TeacherOutput, targets: torch.Tensor,
                   images: torch.Tensor) -> Dict[str, torch.Tensor]:
        settings = self.settings
        weight = self.distillation_weight() if self.training else settings.distill_weight
        if self.training:
            self._batch += 1
        features = s.features[self.projected_stage].float()
        prefix = t.num_prefix_tokens
        teacher_qkv = tuple(x[:, :, prefix:].float() for x in t.qkv)
        teacher_tokens = t.tokens[:, prefix:].float()

        proj1 = pca_loss(self.pca(features, teacher_qkv), teacher_qkv, attention=settings.pca_attention,
                         attention_weight=settings.pca_attention_weight, value_weight=settings.pca_value_weight)
        student_tokens = self.gl(features)
        proj2 = F.mse_loss(student_tokens, teacher_tokens)
        ce = F.cross_entropy(s.logits, targets, label_smoothing=self.label_smoothing)
        terms = {"proj1": proj1, "proj2": proj2, "ce": ce}
        if weight > 0 and settings.adversarial_weight > 0:
            if self.training and not self._views_everywhere():
                with _running_statistics_frozen(self.student):
                    view_features = self.student(self.generator(images)).features[self.projected_stage].float()
                view_tokens = self.gl(view_features)
            else:
                view_tokens = student_tokens
            terms["mvg"] = self._adversarial(view_tokens)
            terms["fake"], terms["real"] = view_tokens.detach().mean(1), teacher_tokens.mean(1)
        distillation = proj1 + proj2 + settings.adversarial_weight * terms.get("mvg", 0.0)
        terms["total"] = weight * distillation + settings.ce_weight * ce
        return terms
