"""A synthetic, deterministic localisation benchmark: objects whose class is one small part.

Each image (112 x 112 by default, a 14 x 14 grid of 8-pixel patches) holds one object: a
large body (an ellipse, a rounded rectangle or a blob) that spans many patches, carrying
one small badge. The class is the badge: its shape (disk, square, triangle, cross) and
its hue, one per class; the body's shape, size and colour say nothing about it (bodies and
distractors take colours away from the class hues). So an
image-label classifier only needs the badge, and its class attention tends to cover the
badge only, while the box to find is the whole object's (body and badge). Background:
stripes and smooth noise, with line segments and small blobs as distractors.

Exact masks and inclusive boxes come with every image; objects cover about 9-35 % of the
image, so a whole-image box never reaches IoU 0.5. Everything derives from a seed, and the
pretraining, training and test splits use disjoint seed streams.
"""
from __future__ import annotations

import numpy as np

CLASSES = ("disk", "square", "triangle", "cross")
BODIES = ("ellipse", "rounded rectangle", "blob")
# The body's two-colour texture: random in the benchmark (it says nothing about the class),
# the label of the backbone's pretraining task (every body patch shows it).
TEXTURES = ("horizontal stripes", "vertical stripes", "checkerboard", "dots")
# Each class's badge has its shape and a hue of its own (jittered); bodies and distractors
# take colours away from these, so only the badge tells the class.
CLASS_COLOURS = np.array([(0.9, 0.1, 0.1), (0.1, 0.75, 0.1), (0.15, 0.25, 0.95), (0.95, 0.85, 0.1)])
SPLITS = {"train": 0, "test": 1, "pretrain": 2}


def _shape_mask(kind: str, yy, xx, cy, cx, ry, rx):
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    if kind == "disk":
        return dy ** 2 + dx ** 2 <= 1
    if kind == "square":
        return (np.abs(dy) <= 1) & (np.abs(dx) <= 1)
    if kind == "triangle":
        return (dy <= 1) & (dy >= -1) & (np.abs(dx) <= (dy + 1) / 2)
    if kind == "cross":
        return ((np.abs(dy) <= 1) & (np.abs(dx) <= 0.33)) | ((np.abs(dx) <= 1) & (np.abs(dy) <= 0.33))
    raise ValueError(kind)


def _body_mask(kind: str, rng, yy, xx, cy, cx, ry, rx):
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    if kind == "ellipse":
        return dy ** 2 + dx ** 2 <= 1
    if kind == "rounded rectangle":                 # a superellipse
        return np.abs(dy) ** 4 + np.abs(dx) ** 4 <= 1
    angle = np.arctan2(dy, dx)                      # wobbly blob
    radius = 1 + sum(rng.uniform(-0.12, 0.12) * np.cos(k * angle + rng.uniform(0, 6.3)) for k in (2, 3))
    return np.hypot(dy, dx) <= radius


def _background(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(0.2, 0.8, 3)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    for _ in range(2):  # stripes
        theta, freq, amp = rng.uniform(0, np.pi), rng.uniform(0.05, 0.25), rng.uniform(0.03, 0.12)
        wave = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + rng.uniform(0, 6.3))
        img += amp * wave[..., None] * rng.uniform(-1, 1, 3)
    coarse = rng.normal(0, 0.12, (8, 8, 3))  # smooth noise: bilinear upsampling of a coarse grid
    idx = np.linspace(0, 7, size)
    i0 = np.floor(idx).astype(int).clip(0, 6)
    t = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - t)[..., None] + coarse[i0 + 1] * t[..., None]
    smooth = rows[:, i0] * (1 - t.T)[..., None] + rows[:, i0 + 1] * t.T[..., None]
    return img + smooth + rng.normal(0, 0.03, (size, size, 3))


def _texture(kind: str, yy, xx, period: float, phase):
    """A boolean pattern of the given kind and period (pixels)."""
    y, x = (yy + phase[0]) / period, (xx + phase[1]) / period
    if kind == "horizontal stripes":
        return (y % 1) < 0.5
    if kind == "vertical stripes":
        return (x % 1) < 0.5
    if kind == "checkerboard":
        return ((np.floor(x) + np.floor(y)) % 2) == 0
    if kind == "dots":
        return (x % 1 - 0.5) ** 2 + (y % 1 - 0.5) ** 2 < 0.09
    raise ValueError(kind)


def _distractors(rng, img):
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(rng.integers(3, 8)):
        colour = _neutral_colour(rng)
        if rng.random() < 0.5:  # a thin line segment
            y0, x0 = rng.uniform(0, size, 2)
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.12, 0.35) * size
            y1, x1 = y0 + length * np.sin(angle), x0 + length * np.cos(angle)
            vy, vx = y1 - y0, x1 - x0
            tproj = np.clip(((yy - y0) * vy + (xx - x0) * vx) / (vy * vy + vx * vx), 0, 1)
            dist = np.hypot(yy - (y0 + tproj * vy), xx - (x0 + tproj * vx))
            img[dist <= 0.8] = colour
        else:  # a small blob
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(0.015, 0.04) * size
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
    return img


def _neutral_colour(rng, against=None):
    """A random colour at least 0.45 (L1) from every class colour and, if given, 0.6 from `against`."""
    while True:
        colour = rng.uniform(0, 1, 3)
        if np.abs(CLASS_COLOURS - colour).sum(1).min() >= 0.45 and \
                (against is None or np.abs(colour - against).sum() >= 0.6):
            return colour


def make_image(rng, size: int = 112):
    """(image [size, size, 3] float32 in [0, 1], label, mask [size, size] bool, box (x0, y0, x1, y1),
    texture (an index into TEXTURES))."""
    label = int(rng.integers(len(CLASSES)))
    body_kind = int(rng.integers(len(BODIES)))
    texture = int(rng.integers(len(TEXTURES)))
    img = _distractors(rng, _background(rng, size))
    yy, xx = np.mgrid[0:size, 0:size]
    ry = rng.uniform(0.14, 0.25) * size                    # body: 31-56 px tall at 112 px
    rx = float(np.clip(ry * rng.uniform(0.7, 1.45), 0.13 * size, 0.34 * size))
    cy = rng.uniform(ry + 1, size - ry - 1)
    cx = rng.uniform(rx + 1, size - rx - 1)
    body = _body_mask(BODIES[body_kind], rng, yy, xx, cy, cx, ry, rx)
    body_colour = _neutral_colour(rng, img[body].mean(0))
    second = _neutral_colour(rng, body_colour)
    pattern = _texture(TEXTURES[texture], yy, xx, rng.uniform(4, 6) * size / 112, rng.uniform(0, 6, 2))
    img[body] = np.where(pattern[body][:, None], second, body_colour) + rng.normal(0, 0.03, (int(body.sum()), 3))
    rb = max(rng.uniform(0.3, 0.38) * min(ry, rx), 0.06 * size)   # badge: 13-21 px across at 112 px
    span_y, span_x = max(ry - rb - 1, 0), max(rx - rb - 1, 0)
    by = cy + rng.uniform(-0.7, 0.7) * span_y              # well inside the body
    bx = cx + rng.uniform(-0.7, 0.7) * span_x
    badge = _shape_mask(CLASSES[label], yy, xx, by, bx, rb, rb)
    img[badge] = np.clip(CLASS_COLOURS[label] + rng.normal(0, 0.06, 3), 0, 1)
    mask = body | badge
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return np.clip(img, 0, 1).astype(np.float32), label, mask, box, texture


def make_split(n: int, seed: int, split: str, size: int = 112, with_textures: bool = False):
    """Arrays for one split: images [n, 3, size, size] float32, labels [n] int64,
    masks [n, size, size] bool, boxes [n, 4] int64, and with_textures=True the body textures
    [n] int64 (indices into TEXTURES). The splits 'pretrain', 'train' and 'test' draw from
    disjoint seed streams (SeedSequence spawn keys 2, 0 and 1)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS[split],)))
    images = np.empty((n, 3, size, size), np.float32)
    labels = np.empty(n, np.int64)
    masks = np.empty((n, size, size), bool)
    boxes = np.empty((n, 4), np.int64)
    textures = np.empty(n, np.int64)
    for i in range(n):
        img, labels[i], masks[i], boxes[i], textures[i] = make_image(rng, size)
        images[i] = img.transpose(2, 0, 1)
    return (images, labels, masks, boxes, textures) if with_textures else (images, labels, masks, boxes)
