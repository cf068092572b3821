"""What a call costs at the sizes distillation uses: each op's forward + backward against
the plain-PyTorch composition a user would write instead, at a tiny size (the per-call
cost: host work, no arithmetic to speak of), at the AGKD paper's sizes, at a few large
sizes, and the whole AGKD loss path as one case. Both sides run in one session on the
same inputs. Run: python -m benchmarks.overhead (writes benchmarks/results/overhead_*).

Each timed round runs ``inner`` steps back to back and, on a GPU, synchronises once at
its end, so a round measures throughput, not one launch's latency."""
import os

import pytest
import torch
import torch.nn.functional as F

import agkd_ops
from agkd_ops import reference

DEVICES = os.environ.get("AGKD_BENCH_DEVICES", "cpu" + (",cuda" if torch.cuda.is_available() else "")).split(",")
TEMPERATURE, KD_WEIGHT, WINDOW = 4.0, 0.9, 3
# EfficientNet-B0 at 224 px: the outputs of stages 3, 4 and 5 (strides 8, 16, 32), and the
# teacher's 14x14 attention map (ViT-B/16 tokens).
B0_STAGES = [(40, 28), (112, 14), (320, 7)]
TEACHER_GRID = 14


# ------------------------------------------------------------ the torch compositions

def torch_kl(s, t):
    return TEMPERATURE**2 * F.kl_div(F.log_softmax(s / TEMPERATURE, 1), F.log_softmax(t / TEMPERATURE, 1),
                                     log_target=True, reduction="batchmean")


def torch_kd(s, t, y):
    return (1 - KD_WEIGHT) * F.cross_entropy(s, y) + KD_WEIGHT * torch_kl(s, t)


def torch_ssim_loss(x, y):
    from pytorch_msssim import ssim
    return 1 - ssim(x, y, data_range=1.0, win_size=WINDOW, size_average=True)


def torch_hybrid(x, y):
    cosine = 1 - F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1).mean()
    return 0.5 * torch_ssim_loss(x, y) + 0.5 * cosine


def torch_attention_map(f):
    n, _c, h, w = f.shape
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1).view(n, 1, h, w)


def torch_align(s, t, loss):
    up = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    return F.mse_loss(up, t) if loss == "mse" else torch_hybrid(up, t)


def ours_align(s, t, loss):
    if loss == "mse":
        return agkd_ops.attention_align_loss(s, t, loss="mse")
    return agkd_ops.attention_align_loss(s, t, loss="hybrid", window_size=WINDOW)


def torch_minmax(maps):
    """Per (sample, channel) map, (m - min) / (max - min), 0 for a constant map: the plain
    composition (agkd_ops.reference.minmax_scale)."""
    return reference.minmax_scale(maps)


def torch_agkd_path(features, teacher_map, s, t, y):
    """The AGKD loss of one batch as plain torch: attention maps of three student stages,
    min-max scaled, each aligned (hybrid) with the scaled teacher map, plus Hinton KD."""
    t_scaled = torch_minmax(teacher_map)
    terms = [torch_align(torch_minmax(torch_attention_map(f)), t_scaled, "hybrid") for f in features]
    return torch_kd(s, t, y) + torch.stack(terms).mean()


def ours_agkd_path(features, teacher_map, s, t, y):
    """The same with agkd_ops, the scaling fused into the alignment (scale="minmax")."""
    terms = [agkd_ops.attention_align_loss(agkd_ops.attention_map(f), teacher_map, loss="hybrid", window_size=WINDOW,
                                           scale="minmax") for f in features]
    return agkd_ops.kd_loss(s, t, y, temperature=TEMPERATURE, kd_weight=KD_WEIGHT) + torch.stack(terms).mean()


# ------------------------------------------------------------------------- the cases

def _logits(n, k, g):
    return [3 * torch.randn(n, k, generator=g), 3 * torch.randn(n, k, generator=g),
            torch.randint(0, k, (n,), generator=g)]


def _maps(shape, g):
    return [torch.rand(shape, generator=g), torch.rand(shape, generator=g)]


def _path_inputs(n, g):
    features = [torch.randn(n, c, s, s, generator=g) for c, s in B0_STAGES]
    return [features, torch.rand(n, 1, TEACHER_GRID, TEACHER_GRID, generator=g)] + _logits(n, 100, g)


# (size class, name, make inputs from a generator, ours, torch). The first input (or list
# of inputs) is the student's and requires grad.
CASES = []
for size, n, k in [("tiny", 8, 10), ("paper", 128, 100), ("paper", 256, 1000), ("large", 4096, 1000)]:
    CASES.append((size, f"kd_loss {n}x{k}", lambda g, n=n, k=k: _logits(n, k, g),
                  lambda s, t, y: agkd_ops.kd_loss(s, t, y, temperature=TEMPERATURE, kd_weight=KD_WEIGHT), torch_kd))
    CASES.append((size, f"kd_kl_div {n}x{k}", lambda g, n=n, k=k: _logits(n, k, g)[:2],
                  lambda s, t: agkd_ops.kd_kl_div(s, t, temperature=TEMPERATURE), torch_kl))
# kd_loss with F.cross_entropy's options, against plain kd_loss at the same size (the
# "large" kd_loss row above) and against torch with the same options.
OPTION_N, OPTION_K = 4096, 1000


def _option_inputs(g, option):
    s, t, y = _logits(OPTION_N, OPTION_K, g)
    if option == "probabilities":
        y = torch.softmax(torch.randn(OPTION_N, OPTION_K, generator=g), 1)
    elif option == "ignore_index":
        y[::10] = -100  # a tenth of the rows ignored
    return [s, t, y]


def torch_kd_options(s, t, y, option):
    ce = F.cross_entropy(s, y, label_smoothing=0.1 if option == "label_smoothing" else 0.0)
    return (1 - KD_WEIGHT) * ce + KD_WEIGHT * torch_kl(s, t)


_KD_OPTIONS = {"label_smoothing": dict(label_smoothing=0.1), "probabilities": {},
               "ignore_index": dict(ignore_index=-100)}
for option, kw in _KD_OPTIONS.items():
    CASES.append(("large", f"kd_loss {OPTION_N}x{OPTION_K} {option}", lambda g, option=option: _option_inputs(g, option),
                  lambda s, t, y, kw=kw: agkd_ops.kd_loss(s, t, y, temperature=TEMPERATURE, kd_weight=KD_WEIGHT, **kw),
                  lambda s, t, y, option=option: torch_kd_options(s, t, y, option)))
for size, shape in [("tiny", (8, 1, 8, 8)), ("paper", (128, 1, 14, 14)), ("large", (128, 1, 56, 56))]:
    label = "x".join(map(str, shape))
    CASES.append((size, f"ssim_loss {label} w{WINDOW}", lambda g, shape=shape: _maps(shape, g),
                  lambda x, y: agkd_ops.ssim_loss(x, y, window_size=WINDOW), torch_ssim_loss))
    CASES.append((size, f"hybrid_loss {label} w{WINDOW}", lambda g, shape=shape: _maps(shape, g),
                  lambda x, y: agkd_ops.hybrid_loss(x, y, window_size=WINDOW), torch_hybrid))
for size, shape in [("tiny", (8, 16, 8, 8))] + [("paper", (128, c, s, s)) for c, s in B0_STAGES]:
    CASES.append((size, f"attention_map {'x'.join(map(str, shape))}",
                  lambda g, shape=shape: [torch.randn(shape, generator=g)],
                  lambda f: agkd_ops.attention_map(f).square().sum(),
                  lambda f: torch_attention_map(f).square().sum()))
for size, n, src, dst in [("tiny", 8, 4, 8), ("paper", 128, 7, 14), ("paper", 128, 14, 14),
                          ("paper", 128, 28, 14), ("large", 128, 28, 56)]:
    for loss in ("hybrid", "mse"):
        CASES.append((size, f"attention_align_loss {loss} {n}x1x{src}x{src}->{dst}x{dst}",
                      lambda g, n=n, src=src, dst=dst: [torch.rand(n, 1, src, src, generator=g),
                                                        torch.rand(n, 1, dst, dst, generator=g)],
                      lambda s, t, loss=loss: ours_align(s, t, loss),
                      lambda s, t, loss=loss: torch_align(s, t, loss)))
CASES.append(("paper", "AGKD loss path (B0 stages 3-5 -> 14x14 hybrid w3, scale minmax, kd_loss 128x100)",
              lambda g: _path_inputs(128, g), ours_agkd_path, torch_agkd_path))

# Steps per timed round: enough that a round is well above the timer's resolution.
INNER = {"cpu": {"tiny": 200, "paper": 5, "large": 1}, "cuda": {"tiny": 1000, "paper": 1000, "large": 20}}
ROUNDS = {"tiny": 30, "paper": 15, "large": 7}


def _to(value, device, student):
    if isinstance(value, list):
        return [_to(v, device, student) for v in value]
    value = value.to(device)
    return value.requires_grad_(True) if student and value.is_floating_point() else value


def _leaves(value):
    return value if isinstance(value, list) else [value]


PARAMS = [(device, impl, case) for device in DEVICES for case in CASES for impl in ("agkd_ops", "torch")]


@pytest.mark.parametrize("device,impl,case", PARAMS, ids=[f"{d}-{c[1]}-{i}" for d, i, c in PARAMS])
def test_overhead(benchmark, device, impl, case):
    size, name, make, ours, theirs = case
    fn = ours if impl == "agkd_ops" else theirs
    inputs = make(torch.Generator().manual_seed(0))
    inputs = [_to(inputs[0], device, True)] + [_to(v, device, False) for v in inputs[1:]]
    inner = INNER[device][size]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        for _ in range(inner):
            for leaf in _leaves(inputs[0]):
                leaf.grad = None
            fn(*inputs).backward()
        sync()

    agkd_ops.set_backend("native")  # a missing kernel is an error, not a silent reference run
    try:
        run()
        benchmark.group = f"{device} {name}"
        benchmark.extra_info.update(device=device, impl=impl, case=name, size=size, inner=inner)
        benchmark.pedantic(run, rounds=ROUNDS[size], iterations=1, warmup_rounds=2)
    finally:
        agkd_ops.set_backend("auto")
