"""CAKD's faithful parts: multi-view samples made in pixel space, which terms see them, the
projected stage matched to the teacher's token grid, the PCA loss forms, the distillation
schedule, and every CAKD setting reaching the object from the configuration."""
import copy

import pytest
import torch
import torch.nn.functional as F

from agkd_models.config import ConfigError, validate_config
from agkd_models.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from agkd_models.distillers import CAKD, CAKDSettings, MultiViewGenerator, build_task, match_teacher_grid, pca_loss
from tests.test_models import NUM_CLASSES, tiny_student, tiny_teacher

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalise(pixels):
    return (pixels - MEAN) / STD


def pixels_of(images):
    return images * STD + MEAN


def only(**kw):
    """A generator that applies only the transformation ``kw`` turns on, always."""
    settings = dict(p=1.0, jitter=0.0, crop_scale=1.0, degrees=0.0, mask_ratio=0.0)
    return MultiViewGenerator(**{**settings, **kw})


def test_masked_patches_are_black_in_pixel_space():
    torch.manual_seed(0)
    white = normalise(torch.ones(4, 3, 32, 32))
    out = pixels_of(only(mask_ratio=1.0)(white))
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6, rtol=0)


def test_what_rotation_brings_in_is_black_and_colours_stay_in_range():
    torch.manual_seed(0)
    white = normalise(torch.ones(16, 3, 32, 32))
    out = pixels_of(only(degrees=45.0)(white))
    assert out.min() > -1e-5 and out.max() < 1 + 1e-5
    corners = out[:, :, 0, 0]  # the top-left corner leaves the image under any turn of a few degrees
    assert corners.min() < 1e-5
    torch.testing.assert_close(out[:, 0], out[:, 1])  # no per-channel fill colour
    torch.testing.assert_close(out[:, 0], out[:, 2])


def test_jittered_colours_stay_in_pixel_range():
    torch.manual_seed(0)
    images = normalise(torch.rand(32, 3, 16, 16))
    out = pixels_of(only(jitter=0.9)(images))
    assert out.min() > -1e-5 and out.max() < 1 + 1e-5
    assert not torch.allclose(out, pixels_of(images))


def test_generator_at_p0_is_the_identity():
    images = torch.randn(2, 3, 8, 8)
    assert MultiViewGenerator(p=0.0)(images) is images


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g)


def adversarial_from_the_first_step(**kw):
    """A CAKD whose distillation terms (the adversarial one included) are on at once."""
    return CAKD(tiny_teacher(), tiny_student(), ce_only_epochs=0, ramp_epochs=0, **kw)


def record_student_inputs(distiller):
    seen = []
    distiller.student.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach().clone()))
    return seen


def test_cross_entropy_and_projectors_see_the_clean_image(batch):
    images, targets = batch
    distiller = adversarial_from_the_first_step(view_prob=1.0, view_terms="adversarial").train()
    reference = copy.deepcopy(distiller.student)
    seen = record_student_inputs(distiller)
    out = distiller(images, targets)
    assert len(seen) == 2 and torch.equal(seen[0], images) and not torch.equal(seen[1], images)
    # The logits, the CE and the projector inputs are those of the clean image ...
    clean = reference(images)
    torch.testing.assert_close(out.logits, clean.logits.detach())
    torch.testing.assert_close(out.terms["ce"], F.cross_entropy(clean.logits, targets))
    # ... and BatchNorm's running statistics are those of the clean pass alone.
    for (name, mine), theirs in zip(distiller.student.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_with_views_for_all_terms_the_student_sees_only_views(batch):
    images, targets = batch
    distiller = adversarial_from_the_first_step(view_prob=1.0, view_terms="all").train()
    seen = record_student_inputs(distiller)
    distiller(images, targets)
    assert len(seen) == 1 and not torch.equal(seen[0], images)


def test_evaluation_sees_the_clean_image_once(batch):
    images, targets = batch
    distiller = adversarial_from_the_first_step(view_prob=1.0).eval()
    seen = record_student_inputs(distiller)
    with torch.no_grad():
        distiller(images, targets)
    assert len(seen) == 1 and torch.equal(seen[0], images)


@pytest.mark.parametrize("grids,teacher,want", [
    ([(16, 16), (8, 8), (4, 4), (2, 2), (2, 2), (1, 1)], (8, 8), 1),      # efficientnet_b0 at 32 px
    ([(112, 112), (56, 56), (28, 28), (14, 14), (14, 14), (7, 7)], (14, 14), 4),  # at 224 px: the deepest match
    ([(16, 16), (8, 8), (4, 4)], (6, 6), 1),                              # none equal: deepest finer one
    ([(4, 4), (2, 2)], (8, 8), 0),                                        # none as fine: the finest
])
def test_projected_stage_matches_the_teacher_grid(grids, teacher, want):
    assert match_teacher_grid(grids, teacher) == want


def test_cakd_projects_the_stage_with_the_teacher_grid_by_default(batch):
    student = tiny_student()  # attention stages (2, 3): 4x4 and 2x2 at 32 px
    assert student.stage_grids((32, 32))[:4] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    distiller = CAKD(tiny_teacher(), student)
    assert distiller.projected_stage == 1
    out = student(batch[0])
    assert out.features[1].shape[-2:] == (8, 8)  # tapped, at the teacher's 8x8 token grid
    assert distiller.pca.q.in_channels == student.stage_channels(1)
    assert CAKD(tiny_teacher(), tiny_student(), projected_stage=3).projected_stage == 3


def test_a_projected_stage_out_of_range_is_refused():
    with pytest.raises(ValueError, match="stage 12 out of range"):
        CAKD(tiny_teacher(), tiny_student(), projected_stage=12)


def test_pca_loss_forms_from_the_formula():
    g = torch.Generator().manual_seed(0)
    student, teacher = ([torch.randn(2, 3, 5, 4, generator=g) for _ in range(3)] for _ in range(2))
    (qs, ks, vs), (qt, kt, vt) = student, teacher

    def mse(a, b):
        return ((a - b) ** 2).sum().item() / a.numel()

    def scores(q, k):  # explicit sums, not matmul
        return torch.einsum("bhid,bhjd->bhij", q, k) / 2.0  # sqrt(d) = 2

    relation = mse(scores(vs, vs), scores(vt, vt))
    logits = mse(scores(qs, ks).mean(1), scores(qt, kt).mean(1))
    probabilities = mse(scores(qs, ks).softmax(-1), scores(qt, kt).softmax(-1))
    assert pca_loss(student, teacher, attention="logits", attention_weight=0.2, value_weight=0.05).item() == \
        pytest.approx(0.2 * logits + 0.05 * relation, rel=1e-5)
    assert pca_loss(student, teacher, attention="probabilities", attention_weight=1.0, value_weight=1.0).item() == \
        pytest.approx(probabilities + relation, rel=1e-5)
    with pytest.raises(ValueError, match="pca_loss: attention must be one of"):
        pca_loss(student, teacher, attention="softmax")


def test_distillation_weight_schedule():
    distiller = CAKD(tiny_teacher(), tiny_student(), distill_weight=0.2, ce_only_epochs=1, ramp_epochs=2)
    weights = {}
    for epoch in range(4):
        distiller.start_epoch(epoch, batches=4)
        for batch in range(4):
            distiller._batch = batch
            weights[epoch + batch / 4] = distiller.distillation_weight()
    for t, w in weights.items():
        want = 0.0 if t < 1 else 0.2 * min(1.0, (t - 1) / 2)
        assert w == pytest.approx(want), t
    step = CAKD(tiny_teacher(), tiny_student(), distill_weight=0.5, ce_only_epochs=1, ramp_epochs=0)
    step.start_epoch(0, 4)
    assert step.distillation_weight() == 0.0
    step.start_epoch(1, 4)
    assert step.distillation_weight() == 0.5


def test_cross_entropy_alone_before_the_ramp(batch):
    distiller = CAKD(tiny_teacher(), tiny_student(), ce_only_epochs=1, ramp_epochs=1, distill_weight=1.0,
                     ce_weight=0.7).train()
    distiller.start_epoch(0, batches=10)
    out = distiller(*batch)
    assert "mvg" not in out.terms and out.extra is None
    assert out.terms["total"].item() == pytest.approx(0.7 * out.terms["ce"].item(), rel=1e-6)
    assert distiller.extra_step(out) == {} and distiller.discriminator_steps == 0
    distiller.start_epoch(1, batches=10)
    distiller._batch = 5  # halfway up the ramp
    out = distiller(*batch)
    t = out.terms
    want = 0.5 * (t["proj1"] + t["proj2"] + t["mvg"]) + 0.7 * t["ce"]
    assert t["total"].item() == pytest.approx(want.item(), rel=1e-6)


# Values unlike every default, for each setting CAKD reads, and where each lands.
CAKD_SETTINGS = {
    "projected_stage": (2, lambda d: d.projected_stage),
    "pca_attention": ("probabilities", lambda d: d.settings.pca_attention),
    "pca_attention_weight": (0.7, lambda d: d.settings.pca_attention_weight),
    "pca_value_weight": (0.3, lambda d: d.settings.pca_value_weight),
    "replace_prob": (0.25, lambda d: d.pca.replace_prob),
    "replace_elementwise": (False, lambda d: d.pca.elementwise),
    "adversarial_weight": (0.4, lambda d: d.settings.adversarial_weight),
    "ce_weight": (0.6, lambda d: d.settings.ce_weight),
    "distill_weight": (0.15, lambda d: d.settings.distill_weight),
    "ce_only_epochs": (2.0, lambda d: d.settings.ce_only_epochs),
    "ramp_epochs": (3.0, lambda d: d.settings.ramp_epochs),
    "view_terms": ("all", lambda d: d.settings.view_terms),
    "discriminator_every": (4, lambda d: d.settings.discriminator_every),
    "discriminator_lr": (3e-4, lambda d: d.discriminator_optimizer.param_groups[0]["lr"]),
    "dropout": (0.35, lambda d: d.gl.dropout.p),
    "view_prob": (0.8, lambda d: d.generator.p),
}


def test_every_cakd_setting_is_covered():
    assert set(CAKD_SETTINGS) == set(CAKDSettings.rules())
    for key, (value, _) in CAKD_SETTINGS.items():
        assert value != getattr(CAKDSettings(), key), key


@pytest.mark.parametrize("key", sorted(CAKD_SETTINGS))
def test_each_cakd_setting_reaches_the_object(key):
    value, where = CAKD_SETTINGS[key]
    cfg = validate_config({"distill": {"method": "cakd"}, "cakd": {key: value}})
    distiller = build_task("cakd", tiny_teacher(), tiny_student(), cfg.method_settings)
    got = where(distiller)
    assert (got == pytest.approx(value)) if isinstance(value, float) else (got == value), (key, got)


def test_the_old_distill_keys_of_cakd_still_load_with_a_deprecation():
    with pytest.warns(FutureWarning) as caught:
        cfg = validate_config({"distill": {"method": "cakd", "lam": 0.4, "view_terms": "all"}})
    said = [str(w.message) for w in caught]
    assert any("distill.lam is deprecated" in m and "cakd.adversarial_weight" in m for m in said), said
    assert any("distill.view_terms is deprecated" in m and "cakd.view_terms" in m for m in said), said
    assert cfg.cakd.adversarial_weight == 0.4 and cfg.cakd.view_terms == "all"
    with pytest.raises(ConfigError, match=r"cakd\.lam is now called cakd\.adversarial_weight"):
        CAKD(tiny_teacher(), tiny_student(), lam=0.4)
