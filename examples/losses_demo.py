"""A short demonstration of agkd_ops: fit a student attention map to a teacher's with the
fused hybrid loss, and compare the native kernels with the pure-PyTorch reference.

    python examples/losses_demo.py
"""
import time

import torch
import torch.nn.functional as F

import agkd_ops


def teacher_attention(n, size, generator):
    """Smooth blob-shaped maps in [0, 1], like min-max scaled attention maps."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centres = torch.rand(n, 2, generator=generator) * 1.2 - 0.6
    d2 = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    return torch.exp(-d2 / 0.08).unsqueeze(1)


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher = teacher_attention(64, 56, g)
    # A "student" producing 28x28 maps that are upsampled to the teacher's 56x56.
    student_logits = torch.zeros(64, 1, 28, 28, requires_grad=True)
    criterion = agkd_ops.HybridLoss(ssim_weight=0.5, cosine_weight=0.5, padding="reflect")
    optimizer = torch.optim.Adam([student_logits], lr=0.1)
    print(f"agkd_ops backend: {agkd_ops.get_backend()}, build: "
          f"{ {k: v for k, v in agkd_ops.build_info().items() if k in ('cpu', 'cuda', 'cuda_archs')} }")
    for step in range(101):
        student = torch.sigmoid(F.interpolate(student_logits, size=56, mode="bilinear", align_corners=False))
        loss = criterion(student, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            ssim = agkd_ops.ssim(student.detach(), teacher, padding="reflect").item()
            print(f"step {step:3d}  hybrid loss {loss.item():.4f}  SSIM {ssim:.4f}")

    x = torch.rand(128, 1, 56, 56, requires_grad=True)
    y = torch.rand(128, 1, 56, 56)
    for backend in ("native", "reference"):
        if backend == "native" and not agkd_ops.native_available("cpu"):
            continue
        agkd_ops.set_backend(backend)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            agkd_ops.hybrid_loss(x, y).backward()
            times.append(time.perf_counter() - start)
        print(f"hybrid_loss forward+backward, (128, 1, 56, 56), {backend:9s}: "
              f"{1e3 * sorted(times)[len(times) // 2]:.2f} ms (median of 10, CPU)")
    agkd_ops.set_backend("auto")


if __name__ == "__main__":
    main()
