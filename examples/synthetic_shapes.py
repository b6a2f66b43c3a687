"""A synthetic, deterministic localisation benchmark: shapes on clutter.

Each image holds one object whose class is its shape (disk, square, triangle, cross), drawn at a random position, size and aspect in a random colour, over a textured
background (stripes and smooth noise) with distractors (line segments and small blobs).
The object's exact mask and inclusive box come with it; objects cover 4-17% of the image,
so a whole-image box never reaches IoU 0.5. Everything derives from a seed: train and test
splits use disjoint seed streams.
"""
from __future__ import annotations

import numpy as np

CLASSES = ("disk", "square", "triangle", "cross")


def _shape_mask(kind: str, yy, xx, cy, cx, ry, rx):
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    if kind == "disk":
        return dy ** 2 + dx ** 2 <= 1
    if kind == "square":
        return (np.abs(dy) <= 1) & (np.abs(dx) <= 1)
    if kind == "triangle":
        return (dy <= 1) & (dy >= -1) & (np.abs(dx) <= (dy + 1) / 2)
    if kind == "cross":
        return (((np.abs(dy) <= 1) & (np.abs(dx) <= 0.3)) | ((np.abs(dx) <= 1) & (np.abs(dy) <= 0.3)))
    raise ValueError(kind)


def _background(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(0.2, 0.8, 3)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    for _ in range(2):  # stripes
        theta, freq, amp = rng.uniform(0, np.pi), rng.uniform(0.1, 0.5), rng.uniform(0.03, 0.12)
        wave = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + rng.uniform(0, 6.3))
        img += amp * wave[..., None] * rng.uniform(-1, 1, 3)
    coarse = rng.normal(0, 0.12, (8, 8, 3))  # smooth noise: bilinear upsampling of a coarse grid
    idx = np.linspace(0, 7, size)
    i0 = np.floor(idx).astype(int).clip(0, 6)
    t = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - t)[..., None] + coarse[i0 + 1] * t[..., None]
    smooth = rows[:, i0] * (1 - t.T)[..., None] + rows[:, i0 + 1] * t.T[..., None]
    return img + smooth + rng.normal(0, 0.03, (size, size, 3))


def _distractors(rng, img):
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(rng.integers(3, 7)):
        colour = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:  # a thin line segment
            y0, x0 = rng.uniform(0, size, 2)
            angle, length = rng.uniform(0, np.pi), rng.uniform(8, 24)
            y1, x1 = y0 + length * np.sin(angle), x0 + length * np.cos(angle)
            vy, vx = y1 - y0, x1 - x0
            tproj = np.clip(((yy - y0) * vy + (xx - x0) * vx) / (vy * vy + vx * vx), 0, 1)
            dist = np.hypot(yy - (y0 + tproj * vy), xx - (x0 + tproj * vx))
            img[dist <= 0.7] = colour
        else:  # a small blob
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(1.0, 2.5)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
    return img


def make_image(rng, size: int = 64):
    """(image [size, size, 3] float32 in [0, 1], label, mask [size, size] bool, box (x0, y0, x1, y1))."""
    label = int(rng.integers(len(CLASSES)))
    img = _distractors(rng, _background(rng, size))
    yy, xx = np.mgrid[0:size, 0:size]
    while True:
        ry = rng.uniform(0.11, 0.2) * size
        rx = ry * rng.uniform(0.75, 1.33)
        cy = rng.uniform(ry + 1, size - ry - 1)
        cx = rng.uniform(rx + 1, size - rx - 1)
        mask = _shape_mask(CLASSES[label], yy, xx, cy, cx, ry, rx)
        if mask.sum() >= 40:
            break
    colour = rng.uniform(0, 1, 3)
    local = img[mask].mean(0)
    if np.abs(colour - local).sum() < 0.6:  # keep the object visible against its surroundings
        colour = np.clip(1 - local + rng.normal(0, 0.1, 3), 0, 1)
    img[mask] = colour
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return np.clip(img, 0, 1).astype(np.float32), label, mask, box


def make_split(n: int, seed: int, split: str, size: int = 64):
    """Arrays for one split: images [n, 3, size, size] float32, labels [n] int64,
    masks [n, size, size] bool, boxes [n, 4] int64. Train and test draw from disjoint
    seed streams (SeedSequence spawn keys 0 and 1)."""
    key = {"train": 0, "test": 1}[split]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))
    images = np.empty((n, 3, size, size), np.float32)
    labels = np.empty(n, np.int64)
    masks = np.empty((n, size, size), bool)
    boxes = np.empty((n, 4), np.int64)
    for i in range(n):
        img, labels[i], masks[i], boxes[i] = make_image(rng, size)
        images[i] = img.transpose(2, 0, 1)
    return images, labels, masks, boxes
