"""agkd_models at tiny sizes (vgg11 + vit_tiny at 32 px, efficientnet_b0 student): output
shapes, the teacher's fusion, attention maps, ViT attention against an explicit softmax,
frozen teacher, PCA replacement rates, the discriminator schedule, that every distiller
can learn, and what CAKD saves."""
import copy

import pytest
import torch
import torch.nn.functional as F

from agkd_models import (AGKD, ATTENTION_LOSSES, CAKD, HybridTeacher, LogitKD, PCAProjector, Student,
                         distillation_factor, probability_correlation, relative_error, teacher_student_kl,
                         topk_accuracy, transferability)

NUM_CLASSES = 10


def tiny_teacher(**kw):
    torch.manual_seed(0)
    return HybridTeacher(NUM_CLASSES, cnn="vgg11", vit="vit_tiny_patch16_224",
                         vit_kwargs=dict(img_size=32, patch_size=4), **kw)


def tiny_student():
    torch.manual_seed(1)
    return Student(NUM_CLASSES, name="efficientnet_b0", stages=(2, 3))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g)


@pytest.mark.parametrize("vit_attention,combine", [("cls", "add"), ("rollout", "concat")])
def test_teacher_outputs(batch, vit_attention, combine):
    teacher = tiny_teacher(vit_attention=vit_attention, combine=combine).eval()
    images, _ = batch
    with torch.no_grad():
        out = teacher(images)
    assert out.logits.shape == out.cnn_logits.shape == out.vit_logits.shape == (8, NUM_CLASSES)
    # The fused logits are the linear map of the concatenated branch logits.
    torch.testing.assert_close(out.logits, teacher.fuse(torch.cat([out.cnn_logits, out.vit_logits], 1)))
    channels = 2 if combine == "concat" else 1
    assert out.attention.shape == (8, channels, 8, 8) and out.grid == (8, 8)
    assert (out.attention >= 0).all()
    norms = out.attention.flatten(2).norm(dim=2)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert out.tokens.shape == (8, 65, 192) and out.qkv[0].shape == (8, 3, 65, 64)
    assert out.vit_attention.shape == (8, 1, 8, 8) and (out.vit_attention >= 0).all()
    for tensor in (out.logits, out.attention, out.cnn_attention, out.vit_attention, out.tokens, *out.qkv):
        assert tensor.dtype == torch.float32


def test_vit_attention_matches_explicit_softmax(batch):
    teacher = tiny_teacher().eval()
    images, _ = batch
    block = teacher.vit.blocks[-1]
    captured = {}
    handle = block.register_forward_hook(lambda m, inputs, out: captured.setdefault("x", inputs[0]))
    with torch.no_grad():
        out = teacher(images)
        x = block.norm1(captured["x"])
        attn = block.attn
        b, t, d = x.shape
        q, k, _ = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-2, -1) * (d // attn.num_heads) ** -0.5, dim=-1)
    handle.remove()
    assert attn.fused_attn  # the model kept its fused attention
    want = probs[:, :, 0, 1:].mean(1).reshape(b, 1, 8, 8)
    torch.testing.assert_close(out.vit_attention, want, rtol=1e-5, atol=1e-6)


def test_student_outputs(batch):
    student = tiny_student()
    out = student(batch[0])
    assert out.logits.shape == (8, NUM_CLASSES)
    assert [a.shape for a in out.attention] == [(8, 1, 4, 4), (8, 1, 2, 2)]
    for a in out.attention:
        assert (a >= 0).all()
        torch.testing.assert_close(a.flatten(1).norm(dim=1), torch.ones(8))
    assert set(out.features) == {2, 3} and out.features[3].shape[1] == student.stage_channels(3)
    assert all(t.dtype == torch.float32 for t in [out.logits, *out.attention, *out.features.values()])


def make_distiller(kind, **kw):
    teacher, student = tiny_teacher(), tiny_student()
    if kind == "logit":
        return LogitKD(teacher, student, **kw)
    if kind == "cakd":  # distillation terms from the first step: no cross-entropy-only warm-up
        return CAKD(teacher, student, **{"ce_only_epochs": 0, "ramp_epochs": 0, **kw})
    return AGKD(teacher, student, attention_loss=kind, **kw)


DISTILLERS = ["logit", "cakd"] + list(ATTENTION_LOSSES)


@pytest.mark.parametrize("kind", DISTILLERS)
def test_a_step_changes_only_trainable_parameters(batch, kind):
    distiller = make_distiller(kind).train()
    teacher_state = copy.deepcopy(distiller.teacher.state_dict())  # parameters and BN buffers
    student_before = copy.deepcopy(distiller.student.state_dict())
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
    terms = distiller(*batch).terms
    assert set(terms) >= {"total"} and all(v.dim() == 0 for v in terms.values())
    optimizer.zero_grad()
    terms["total"].backward()
    optimizer.step()
    assert not distiller.teacher.training
    for name, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[name]), name
    assert all(p.grad is None for p in distiller.teacher.parameters())
    changed = [n for n, v in distiller.student.state_dict().items() if not torch.equal(v, student_before[n])]
    assert changed


@pytest.mark.parametrize("kind", DISTILLERS)
def test_every_distiller_can_learn(batch, kind):
    distiller = make_distiller(kind).train()
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)

    def total():
        torch.manual_seed(123)  # the same views, replacements and dropout each time
        with torch.no_grad():
            return distiller(*batch).terms["total"].item()

    before = total()
    for step in range(30):
        torch.manual_seed(step)
        loss = distiller(*batch).terms["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert total() < before


@pytest.mark.parametrize("elementwise", [True, False])
def test_pca_replacement_rate_and_never_at_eval(elementwise):
    torch.manual_seed(0)
    projector = PCAProjector(16, 24, 3, (4, 4), replace_prob=0.3, elementwise=elementwise).train()
    features = torch.randn(2, 16, 4, 4)
    teacher = tuple(torch.randn(2, 3, 16, 8) for _ in range(3))
    replaced = []
    for _ in range(500 if not elementwise else 5):
        for mine, theirs in zip(projector(features, teacher), teacher):
            is_teacher = mine == theirs  # a convolution's output never equals a random draw
            if not elementwise:  # whole tensors: all of it or none
                assert is_teacher.all() or not is_teacher.any()
                is_teacher = is_teacher.all().reshape(1)
            replaced.append(is_teacher.flatten().float())
    rate = torch.cat(replaced).mean().item()
    assert abs(rate - 0.3) < 0.05  # at least 1500 Bernoulli(0.3) draws: sd <= 0.012
    projector.eval()
    for _ in range(50):
        q, k, v = projector(features, teacher)
        assert not (q == teacher[0]).any()


def test_discriminator_steps_once_every_five_iterations(batch):
    # As the trainer drives it: forward, the main step's backward, then the task's own step.
    distiller = make_distiller("cakd", discriminator_every=5).train()
    weights = [p.detach().clone() for p in distiller.discriminator.parameters()]
    for i in range(1, 13):
        output = distiller(*batch)
        output.terms["total"].backward()
        terms = distiller.extra_step(output)
        assert ("mad" in terms) == (i % 5 == 0)
        assert distiller.discriminator_steps == i // 5
    assert any(not torch.equal(a, b) for a, b in zip(weights, distiller.discriminator.parameters()))
    assert distiller.extra_optimizers() == [distiller.discriminator_optimizer]


def test_cakd_forward_never_steps_an_optimizer(batch):
    distiller = make_distiller("cakd", discriminator_every=1).train()
    weights = [p.detach().clone() for p in distiller.discriminator.parameters()]
    for _ in range(3):
        output = distiller(*batch)
    assert distiller.discriminator_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, distiller.discriminator.parameters()))
    assert set(output.extra) == {"fake", "real"} and not output.extra["fake"].requires_grad


def test_cakd_saves_the_student_alone(batch, tmp_path):
    distiller = make_distiller("cakd").train()
    distiller(*batch).terms["total"].backward()
    path = tmp_path / "student.pt"
    torch.save(distiller.inference_model().state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state.keys() == distiller.student.state_dict().keys()
    assert not any(k.split(".")[0] in ("pca", "gl", "discriminator", "generator", "teacher") for k in state)
    fresh = tiny_student()
    fresh.load_state_dict(state)


def test_metrics():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]])
    targets = torch.tensor([0, 2, 1])
    top1, top2 = topk_accuracy(logits, targets, ks=(1, 2))
    assert top1 == pytest.approx(1 / 3) and top2 == pytest.approx(2 / 3)
    assert relative_error(0.2, 0.1) == pytest.approx(2.0) and relative_error(0.2, 0.0) == float("inf")
    assert teacher_student_kl(logits, logits) == pytest.approx(0.0, abs=1e-7)
    want = F.kl_div(F.log_softmax(logits.flip(0), 1), F.log_softmax(logits, 1), log_target=True,
                    reduction="batchmean").item()
    assert teacher_student_kl(logits.flip(0), logits) == pytest.approx(want)
    assert probability_correlation(logits, logits) == pytest.approx(1.0)
    teacher, student = tiny_teacher(), tiny_student()
    assert distillation_factor(teacher, student) == pytest.approx(
        sum(p.numel() for p in teacher.parameters()) / sum(p.numel() for p in student.parameters()))
    projection = torch.nn.Identity()
    features = torch.randn(4, 6)
    assert transferability(features, 2 * features, projection) == pytest.approx(1.0)


# Each AGKD setting, a value unlike its default, and the attention loss under which it acts.
AGKD_CHANGES = {"temperature": (2.0, "hybrid"), "kd_weight": (0.3, "hybrid"), "logit_weight": (0.5, "hybrid"),
                "attention_weight": (2.0, "hybrid"), "ssim_weight": (0.9, "hybrid"), "cosine_weight": (0.1, "hybrid"),
                "window_size": (5, "ssim"), "sigma": (0.5, "ssim"), "padding": ("reflect", "ssim"),
                "perceptual_layers": (2, "perceptual"),
                "attention_loss": ("mse", "hybrid"), "logit_loss": ("dkd", "hybrid")}


def test_every_logit_and_agkd_setting_changes_the_loss(batch):
    # A setting that reaches no computation is a setting silently dropped.
    from agkd_models import AGKDSettings, LogitKDSettings
    assert set(AGKD_CHANGES) == set(AGKDSettings.rules())

    def total(kind, **changes):
        distiller = make_distiller(kind, **changes).eval()
        return distiller(*batch).terms["total"].item()

    for key, (value, loss) in AGKD_CHANGES.items():
        if key == "attention_loss":
            assert total(value) != total(loss), key
        else:
            assert total(loss, **{key: value}) != total(loss), key
    for key in LogitKDSettings.rules():
        assert total("logit", **{key: AGKD_CHANGES[key][0]}) != total("logit"), key


def test_checkpoints_leave_the_frozen_teacher_out_and_resume_into_a_rebuilt_one(batch, tmp_path):
    from agkd_models.engine import TrainConfig, Trainer
    data = torch.utils.data.TensorDataset(*batch)
    settings = dict(batch_size=8, device="cpu", progress=False)
    Trainer(make_distiller("cakd"), TrainConfig(epochs=1, **settings), tmp_path).fit(data, data)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["task"]
    distiller = make_distiller("cakd")
    trained = {k for k in distiller.state_dict() if not k.startswith("teacher.")}
    assert set(saved) == trained  # the student, projectors, discriminator and CAKD's counters: no teacher
    assert any(k.startswith("student.") for k in saved) and any(k.startswith("discriminator.") for k in saved)
    history = Trainer(distiller, TrainConfig(epochs=2, **settings), tmp_path).fit(data, data, resume=True)
    assert [r["epoch"] for r in history] == [0, 1]
    assert distiller.iterations == 2  # the discriminator's schedule went on from the checkpoint's


def test_minmax_normalize_sends_a_constant_map_to_zero_with_zero_gradient():
    """A dead stage or a blank image gives a constant map; clamping its range to eps
    would give it a gradient of ~1/eps (1e12)."""
    from agkd_models import minmax_normalize

    torch.manual_seed(0)
    maps = torch.rand(3, 2, 5, 5)
    maps[0, 1] = 0.0            # all zero
    maps[1, 0] = 7.0            # constant
    maps[2, 1] = 1.0 + torch.rand(5, 5) * 1e-13  # range below eps
    maps.requires_grad_(True)
    upstream = torch.randn(3, 2, 5, 5)
    out = minmax_normalize(maps)
    (out * upstream).sum().backward()
    for n, c in ((0, 1), (1, 0), (2, 1)):
        assert torch.equal(out[n, c], torch.zeros(5, 5))
        assert torch.equal(maps.grad[n, c], torch.zeros(5, 5))
    # The other maps: the plain formula, values and gradients (no ties in random maps).
    plain = maps.detach().clone().requires_grad_(True)
    flat = plain.flatten(2)
    lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    ((flat - lo) / (hi - lo)).view_as(plain).mul(upstream).sum().backward()
    for n, c in ((0, 0), (1, 1), (2, 0)):
        expected = (maps[n, c] - maps[n, c].min()) / (maps[n, c].max() - maps[n, c].min())
        torch.testing.assert_close(out[n, c], expected, rtol=0, atol=0)
        torch.testing.assert_close(maps.grad[n, c], plain.grad[n, c])
