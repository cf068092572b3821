"""Brute-force float64 NumPy oracles written from the definitions, sharing no code with
agkd_ops: explicit 2-D windows per output pixel (no separable blur, no convolution)."""
import numpy as np


def gaussian_2d(window_size, sigma):
    r = np.arange(window_size) - window_size // 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def ssim_per_sample(x, y, window_size=11, sigma=1.5, data_range=1.0, k1=0.01, k2=0.03,
                    padding="valid"):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w2 = gaussian_2d(window_size, sigma)
    p = window_size // 2
    if padding != "valid":
        mode = "reflect" if padding == "reflect" else "constant"
        pad = ((0, 0), (0, 0), (p, p), (p, p))
        x, y = np.pad(x, pad, mode=mode), np.pad(y, pad, mode=mode)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    n, c, h, w = x.shape
    ho, wo = h - window_size + 1, w - window_size + 1
    out = np.zeros(n)
    for i in range(ho):
        for j in range(wo):
            wx = x[:, :, i:i + window_size, j:j + window_size]
            wy = y[:, :, i:i + window_size, j:j + window_size]
            mx = (wx * w2).sum((-1, -2))
            my = (wy * w2).sum((-1, -2))
            vx = (w2 * (wx - mx[..., None, None]) ** 2).sum((-1, -2))
            vy = (w2 * (wy - my[..., None, None]) ** 2).sum((-1, -2))
            cxy = (w2 * (wx - mx[..., None, None]) * (wy - my[..., None, None])).sum((-1, -2))
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            out += s.sum(1)
    return out / (c * ho * wo)


def cosine_per_sample(x, y, eps=1e-8):
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    nx = np.maximum(np.sqrt((x * x).sum(1)), eps)
    ny = np.maximum(np.sqrt((y * y).sum(1)), eps)
    return (x * y).sum(1) / (nx * ny)


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kd_kl_per_sample(student, teacher, temperature):
    """τ²·Σ_k p_t (log p_t − log p_s) with p = softmax(logits / τ), explicitly."""
    s = np.asarray(student, dtype=np.float64) / temperature
    t = np.asarray(teacher, dtype=np.float64) / temperature
    log_p_s, log_p_t = _log_softmax(s), _log_softmax(t)
    p_t = np.exp(log_p_t)
    return temperature**2 * (p_t * (log_p_t - log_p_s)).sum(axis=1)


def cross_entropy_per_sample(logits, target):
    z = np.asarray(logits, dtype=np.float64)
    return -_log_softmax(z)[np.arange(len(z)), np.asarray(target)]
