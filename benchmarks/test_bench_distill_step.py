"""One AGKD distillation step at the paper's sizes (224 px, VGG19 + ViT-B/16 hybrid teacher,
EfficientNet-B0 student, hybrid attention loss on stages 3-5, 100 classes; batch 4 so it
runs on a CPU): the teacher run online vs read from a teacher cache, each with the native
agkd_ops kernels and with the reference ops, in one run. A step is what the trainer does
per batch: fetch and augment the samples (and, cached, read the teacher's rows from the
memory-mapped cache), forward, backward, optimizer step.

Run: pytest benchmarks/test_bench_distill_step.py --benchmark-only, or
python -m benchmarks.step_report for the committed table.
"""
import pytest
import torch

import agkd_ops
from agkd_models.data.cache import CachedTeacherDataset, TeacherCache, write_teacher_cache
from agkd_models.distillers import build_task
from agkd_models.experiments.pipeline import build_student, build_teacher
from agkd_models.config import load_config
from agkd_models.data.datasets import AugmentedDataset, ReplayableAugment

BATCH, NUM_CLASSES = 4, 100
SOURCES, BACKENDS = ("online", "cached"), ("native", "reference")


class _UInt8Images(torch.utils.data.Dataset):
    """In-memory (uint8 image, label) pairs; ``data``/``targets`` as torchvision's sets have
    them, which is what the teacher cache's fingerprint reads."""

    def __init__(self, data, targets):
        self.data, self.targets = data, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.data[index], int(self.targets[index])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config("cifar100", ["agkd.attention_loss=hybrid"])
    torch.manual_seed(0)
    teacher = build_teacher(cfg, NUM_CLASSES)
    task = build_task("agkd", teacher, build_student(cfg, NUM_CLASSES), cfg.agkd).train()
    g = torch.Generator().manual_seed(0)
    raw = _UInt8Images(torch.randint(0, 256, (BATCH, 3, 256, 256), dtype=torch.uint8, generator=g),
                       torch.randint(0, NUM_CLASSES, (BATCH,), generator=g))
    online = AugmentedDataset(raw, ReplayableAugment(224), seed=0)
    path = write_teacher_cache(teacher, online, tmp_path_factory.mktemp("cache") / "cache", epochs=1,
                               teacher_config=cfg.teacher.to_dict(), batch_size=BATCH)
    cached = CachedTeacherDataset(online, TeacherCache.open(path))
    optimizer = torch.optim.Adam(task.student.parameters(), lr=1e-4)
    return task, optimizer, {"online": online, "cached": cached}


def distill_step(task, optimizer, dataset):
    items = [dataset[i] for i in range(BATCH)]
    if isinstance(dataset, CachedTeacherDataset):
        images, targets, teacher_out = dataset.collate_fn(items)
    else:
        images, targets, teacher_out = *torch.utils.data.default_collate(items), None
    terms = task(images, targets, teacher_out=teacher_out).terms
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    optimizer.step()
    return terms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", SOURCES)
def test_distill_step(benchmark, setup, source, backend):
    if backend == "native" and not agkd_ops.native_available("cpu"):
        pytest.skip("native ops not built")
    task, optimizer, datasets = setup
    previous = agkd_ops.get_backend()
    agkd_ops.set_backend(backend)
    try:
        benchmark.group = "distill step"
        benchmark.extra_info.update(source=source, backend=backend, batch=BATCH, image_size=224,
                                    teacher="vgg19 + vit_base_patch16_224", student="efficientnet_b0")
        benchmark.pedantic(distill_step, args=(task, optimizer, datasets[source]), rounds=7, iterations=1,
                           warmup_rounds=1)
    finally:
        agkd_ops.set_backend(previous)
