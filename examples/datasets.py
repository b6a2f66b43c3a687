"""Data for the example: the synthetic benchmark, CUB-200-2011 in its original layout, and
wsolevaluation's metadata layout (ILSVRC, CUB, OpenImages boxes).

Every dataset yields (image [3, S, S] float32 in [0, 1], label, boxes [k, 4] float64) with
the image resized to S x S (S = the backbone's input size, aspect not kept) and its boxes
(x0, y0, x1, y1), inclusive pixels, rescaled with it.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def load_image(path: str) -> np.ndarray:
    """An RGB image [h, w, 3] uint8 from any format OpenCV reads."""
    import cv2
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def rescale_boxes(boxes, original_size, size: int) -> np.ndarray:
    """Boxes [k, 4] (x0, y0, x1, y1) in pixels of an image of original_size (w, h) -> the
    same boxes in a size x size resize of it, clipped to the image."""
    w, h = original_size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * [size / w, size / h, size / w, size / h]
    return np.floor(b).clip(0, size - 1)


class ArrayDataset(torch.utils.data.Dataset):
    """Images already in memory: images [n, 3, S, S] float32, labels [n], boxes [n, 4]."""

    def __init__(self, images, labels, boxes, classes):
        self.images, self.labels, self.classes = images, np.asarray(labels), tuple(classes)
        self.boxes = [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in boxes]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]), int(self.labels[i]), self.boxes[i]


class FileDataset(torch.utils.data.Dataset):
    """Image files: paths, labels, boxes in original pixels, and (optionally) the original
    sizes (w, h); without them the size is read from the image when it is loaded."""

    def __init__(self, paths, labels, boxes, classes, size: int, original_sizes=None):
        self.paths, self.labels, self.classes, self.size = list(paths), np.asarray(labels), tuple(classes), size
        self.raw_boxes = boxes
        self.original_sizes = original_sizes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import cv2
        img = load_image(self.paths[i])
        h, w = img.shape[:2]
        if self.original_sizes is not None and tuple(self.original_sizes[i]) != (w, h):
            raise ValueError(f"{self.paths[i]} is {w} x {h} pixels, the metadata says "
                             f"{self.original_sizes[i][0]} x {self.original_sizes[i][1]}")
        img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        image = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255)
        return image, int(self.labels[i]), rescale_boxes(self.raw_boxes[i], (w, h), self.size)


def collate(items):
    """-> images [B, 3, S, S], labels [B] int64, list of B box arrays."""
    images, labels, boxes = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(boxes)


def _read_rows(path: str, sep=None, min_fields: int = 2):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected file {path}")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split(sep)
            if len(fields) < min_fields:
                raise ValueError(f"{path}:{n}: expected at least {min_fields} fields, got {line!r}")
            rows.append(fields)
    return rows


# ----------------------------------------------------------------------------- CUB-200-2011
def cub_splits(root: str, size: int):
    """CUB-200-2011 as distributed: root/images.txt ("<id> <relative path>"),
    image_class_labels.txt ("<id> <class id, from 1>"), train_test_split.txt ("<id> <1 train,
    0 test>"), bounding_boxes.txt ("<id> <x> <y> <width> <height>", pixels of the original
    image), classes.txt ("<class id> <name>"), images/<relative path>.
    Returns {"train": FileDataset, "test": FileDataset}; box (x, y, w, h) -> (x, y, x + w, y + h)."""
    paths = {i: p for i, p in _read_rows(os.path.join(root, "images.txt"))}
    labels = {i: int(c) - 1 for i, c in _read_rows(os.path.join(root, "image_class_labels.txt"))}
    is_train = {i: s == "1" for i, s in _read_rows(os.path.join(root, "train_test_split.txt"))}
    boxes = {}
    for i, *xywh in _read_rows(os.path.join(root, "bounding_boxes.txt"), min_fields=5):
        x, y, w, h = map(float, xywh[:4])
        boxes.setdefault(i, []).append((x, y, x + w, y + h))
    classes = [name for _, name in sorted(_read_rows(os.path.join(root, "classes.txt")), key=lambda r: int(r[0]))]
    out = {}
    for split, flag in (("train", True), ("test", False)):
        ids = [i for i in paths if is_train.get(i) is flag]
        missing = [i for i in ids if i not in labels or i not in boxes]
        if missing:
            raise ValueError(f"CUB image ids {missing[:5]} have no class label or bounding box")
        out[split] = FileDataset([os.path.join(root, "images", paths[i]) for i in ids], [labels[i] for i in ids],
                                 [boxes[i] for i in ids], classes, size)
    return out


# ----------------------------------------------------------------------------- wsolevaluation
def wsol_split(metadata_root: str, data_root: str, split: str, size: int, need_boxes: bool):
    """One split of wsolevaluation's metadata layout: metadata_root/<split>/image_ids.txt (one
    image path per line, relative to data_root), class_labels.txt ("<path>,<class>"),
    image_sizes.txt ("<path>,<w>,<h>"), localization.txt ("<path>,<x0>,<y0>,<x1>,<y1>", one line
    per box, several for one image allowed). OpenImages' mask localisation is not supported."""
    folder = os.path.join(metadata_root, split)
    ids = [r[0] for r in _read_rows(os.path.join(folder, "image_ids.txt"), min_fields=1)]
    labels = {p: int(c) for p, c in _read_rows(os.path.join(folder, "class_labels.txt"), sep=",")}
    sizes = {p: (int(w), int(h)) for p, w, h in _read_rows(os.path.join(folder, "image_sizes.txt"), sep=",",
                                                          min_fields=3)}
    boxes = {}
    loc = os.path.join(folder, "localization.txt")
    if os.path.isfile(loc):
        for row in _read_rows(loc, sep=","):
            if len(row) != 5:
                raise ValueError(f"{loc}: expected '<path>,<x0>,<y0>,<x1>,<y1>', got {','.join(row)!r} "
                                 f"(mask localisation, as OpenImages', is not supported)")
            boxes.setdefault(row[0], []).append(tuple(float(v) for v in row[1:]))
    elif need_boxes:
        raise FileNotFoundError(f"expected file {loc}: the evaluation split needs boxes")
    missing = [p for p in ids if p not in labels or p not in sizes or (need_boxes and p not in boxes)]
    if missing:
        raise ValueError(f"{folder}: image ids {missing[:5]} lack a class label, a size or (test) a box")
    num_classes = max(labels.values()) + 1
    return FileDataset([os.path.join(data_root, p) for p in ids], [labels[p] for p in ids],
                       [boxes.get(p, [(0, 0, 0, 0)]) for p in ids], [str(c) for c in range(num_classes)],
                       size, [sizes[p] for p in ids])


def wsol_splits(metadata_root: str, data_root: str, size: int, eval_split: str = "test"):
    train = wsol_split(metadata_root, data_root, "train", size, need_boxes=False)
    test = wsol_split(metadata_root, data_root, eval_split, size, need_boxes=True)
    n = max(len(train.classes), len(test.classes))
    train.classes = test.classes = tuple(str(c) for c in range(n))
    return {"train": train, "test": test}


def subset(dataset, n: int | None, seed: int):
    """A seeded random subset of n items (all of them when n is None or >= len)."""
    if n is None or n >= len(dataset):
        return dataset
    idx = np.random.default_rng(seed).permutation(len(dataset))[:n]
    sub = torch.utils.data.Subset(dataset, sorted(idx.tolist()))
    sub.classes = dataset.classes
    return sub


def split_off(dataset, n: int, seed: int):
    """(rest, held): a seeded random n items held out of `dataset` (a validation split carved
    out of the training images) and the others, both with the dataset's classes."""
    if not 0 < n < len(dataset):
        raise ValueError(f"--val-size must be between 1 and {len(dataset) - 1} (the training images), got {n}")
    idx = np.random.default_rng(seed).permutation(len(dataset))
    parts = []
    for chosen in (idx[n:], idx[:n]):
        part = torch.utils.data.Subset(dataset, sorted(chosen.tolist()))
        part.classes = dataset.classes
        parts.append(part)
    return tuple(parts)
