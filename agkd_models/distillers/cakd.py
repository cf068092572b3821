"""Cross-architecture KD (Liu et al., ACCV 2022): a CNN student learns from a ViT teacher
through two projectors of its stage feature map, with a multi-view adversarial game for
robustness. Projectors, generator and discriminator are training-only: the student alone
is what is kept for inference (:meth:`CAKD.student_state_dict`)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.distributed import average_gradients
from ..engine.task import TaskOutput
from ..models.student import Student, StudentOutput
from ..models.teacher import HybridTeacher, TeacherOutput
from .base import Distiller

__all__ = ["PCAProjector", "GLProjector", "MultiViewGenerator", "MultiViewDiscriminator", "CAKD",
           "pca_loss"]

QKV = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _to_grid(features: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    if tuple(features.shape[-2:]) == tuple(grid):
        return features
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


class PCAProjector(nn.Module):
    """Partially cross-attention projector: three 3×3 convolutions map the student's
    feature map, resized to the teacher's patch grid, to Q_S, K_S, V_S of the teacher's
    token width, split into the teacher's heads (B, heads, N, head_dim). In training, each
    of Q_S, K_S, V_S is replaced by the teacher's with probability ``replace_prob``."""

    def __init__(self, in_channels: int, dim: int, heads: int, grid: Tuple[int, int],
                 replace_prob: float = 0.5):
        super().__init__()
        if dim % heads:
            raise ValueError(f"PCAProjector: dim {dim} is not divisible by heads {heads}")
        self.q, self.k, self.v = (nn.Conv2d(in_channels, dim, 3, padding=1) for _ in range(3))
        self.heads, self.grid, self.replace_prob = heads, tuple(grid), replace_prob
        self.last_replaced = (False, False, False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, d = x.shape[:2]
        return x.flatten(2).transpose(1, 2).reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, features: torch.Tensor, teacher_qkv: Optional[QKV] = None) -> QKV:
        x = _to_grid(features, self.grid)
        qkv = [self._split(conv(x)) for conv in (self.q, self.k, self.v)]
        replaced = [False, False, False]
        if self.training and teacher_qkv is not None:
            for i in range(3):
                if torch.rand(()) < self.replace_prob:
                    qkv[i], replaced[i] = teacher_qkv[i].to(qkv[i].dtype), True
        self.last_replaced = tuple(replaced)
        return tuple(qkv)


def pca_loss(student_qkv: QKV, teacher_qkv: QKV) -> torch.Tensor:
    """CAKD eq. 4: ``‖Attn_T − PCAttn_S‖² + ‖V_T V_Tᵀ/√d − V_S V_Sᵀ/√d‖²`` (means)."""
    (qs, ks, vs), (qt, kt, vt) = student_qkv, teacher_qkv
    d = qs.shape[-1]
    attn = lambda q, k: (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(dim=-1)
    relation = lambda v: v @ v.transpose(-2, -1) / math.sqrt(d)
    return F.mse_loss(attn(qs, ks), attn(qt, kt)) + F.mse_loss(relation(vs), relation(vt))


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
    """Views of the student's input for CAKD's adversarial game: colour jitter, random
    crop (resized back), rotation and patch masking, each applied with probability ``p``
    (one draw per batch and transformation; parameters drawn per sample where cheap)."""

    def __init__(self, p: float = 0.5, jitter: float = 0.4, crop_scale: float = 0.7,
                 degrees: float = 30.0, mask_ratio: float = 0.25, mask_patch: int = 4):
        super().__init__()
        self.p, self.jitter, self.crop_scale = p, jitter, crop_scale
        self.degrees, self.mask_ratio, self.mask_patch = degrees, mask_ratio, mask_patch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        b, _, h, w = x.shape
        coin = lambda: bool(torch.rand(()) < self.p)
        if coin():  # brightness and contrast per sample
            gain = 1 + self.jitter * (2 * torch.rand(b, 1, 1, 1, device=x.device) - 1)
            shift = self.jitter * (2 * torch.rand(b, 1, 1, 1, device=x.device) - 1) * x.std()
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * gain + mean + shift
        if coin():  # random crop, resized back
            ch, cw = max(1, int(h * self.crop_scale)), max(1, int(w * self.crop_scale))
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            x = F.interpolate(x[:, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                              align_corners=False)
        if coin():  # rotation per sample
            angle = (2 * torch.rand(b, device=x.device) - 1) * math.radians(self.degrees)
            cos, sin = angle.cos(), angle.sin()
            theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                                 torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
            grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, align_corners=False)
        if coin():  # patch mask per sample
            ph, pw = -(-h // self.mask_patch), -(-w // self.mask_patch)
            keep = (torch.rand(b, 1, ph, pw, device=x.device) >= self.mask_ratio).to(x.dtype)
            x = x * F.interpolate(keep, size=(h, w), mode="nearest")
        return x


class MultiViewDiscriminator(nn.Module):
    """Three fully connected layers: token-mean features -> a real/fake logit."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class CAKD(Distiller):
    """``L_proj1 + L_proj2 + λ·L_MVG + ce_weight·CE`` for the student (and projectors);
    the discriminator minimises ``L_MAD`` with its own optimizer, once every
    ``discriminator_every`` training iterations: an extra step the task declares
    (:meth:`extra_optimizers`, :meth:`extra_step`), taken by the trainer after the main
    step, from the detached tokens the forward returns.

    ``L_proj1``: :func:`pca_loss` between the PCA projector's Q/K/V and the teacher ViT's
    last-block Q/K/V (patch tokens). ``L_proj2``: mean squared distance between the GL
    projector's tokens and the teacher's last-block patch tokens. ``L_MVG``: the student's
    projected features (from a multi-view of the input) should look real to the
    discriminator; ``L_MAD``: the discriminator tells teacher tokens (real) from student
    projections (fake).
    """

    def __init__(self, teacher: HybridTeacher, student: Student, *, replace_prob: float = 0.5,
                 lam: float = 1.0, ce_weight: float = 1.0, discriminator_every: int = 5,
                 discriminator_lr: float = 1e-4, dropout: float = 0.1, view_prob: float = 0.5):
        super().__init__(teacher, student)
        vit = teacher.vit
        dim, heads = vit.embed_dim, vit.blocks[-1].attn.num_heads
        grid = tuple(vit.patch_embed.grid_size)
        channels = student.stage_channels(student.feature_stage)
        self.pca = PCAProjector(channels, dim, heads, grid, replace_prob)
        self.gl = GLProjector(channels, dim, grid, dropout=dropout)
        self.generator = MultiViewGenerator(view_prob)
        self.discriminator = MultiViewDiscriminator(dim)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(),
                                                        lr=discriminator_lr, betas=(0.5, 0.999))
        self.lam, self.ce_weight, self.discriminator_every = lam, ce_weight, discriminator_every
        self.iterations = 0
        self.discriminator_steps = 0

    # Under DDP: the discriminator steps itself and averages its own gradients over the
    # ranks; the PCA projector's convolutions go unused when the teacher's Q/K/V replace them.
    ddp_self_synced = ("discriminator",)
    ddp_find_unused_parameters = True

    def enable_compile(self, student: bool = True) -> None:  # type: ignore[override]
        # The loss path is the whole forward (multi-view generator, projectors): only the
        # student is compiled.
        if student:
            self.student.compile()

    def get_extra_state(self):
        # Saved with state_dict, so a resumed run keeps the discriminator's schedule.
        return {"iterations": self.iterations, "discriminator_steps": self.discriminator_steps}

    def set_extra_state(self, state):
        self.iterations = int(state["iterations"])
        self.discriminator_steps = int(state["discriminator_steps"])

    def trainable_parameters(self):
        """Student and projectors: what the main optimizer updates (not the discriminator)."""
        for module in (self.student, self.pca, self.gl):
            yield from module.parameters()

    def extra_optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.discriminator_optimizer]

    def extra_step(self, output: TaskOutput) -> Dict[str, torch.Tensor]:
        """Every ``discriminator_every`` training iterations, one step of the discriminator
        on ``L_MAD``: teacher tokens real, the student's projections (of this step) fake."""
        self.iterations += 1
        if self.iterations % self.discriminator_every:
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

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                teacher_out: Optional[TeacherOutput] = None) -> TaskOutput:
        t = teacher_out if teacher_out is not None else self.teacher_outputs(images)
        views = self.generator(images) if self.training else images
        s: StudentOutput = self.student(views)
        features = s.features[self.student.feature_stage].float()
        prefix = t.num_prefix_tokens
        teacher_qkv = tuple(x[:, :, prefix:].float() for x in t.qkv)
        teacher_tokens = t.tokens[:, prefix:].float()

        proj1 = pca_loss(self.pca(features, teacher_qkv), teacher_qkv)
        student_tokens = self.gl(features)
        proj2 = F.mse_loss(student_tokens, teacher_tokens)
        d_fake = self.discriminator(student_tokens.mean(1))
        mvg = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        ce = F.cross_entropy(s.logits, targets, label_smoothing=self.label_smoothing)
        total = proj1 + proj2 + self.lam * mvg + self.ce_weight * ce
        terms = {"proj1": proj1, "proj2": proj2, "mvg": mvg, "ce": ce, "total": total}
        extra = {"fake": student_tokens.detach().mean(1), "real": teacher_tokens.mean(1)}
        return TaskOutput(terms, s.logits.detach(), extra)
