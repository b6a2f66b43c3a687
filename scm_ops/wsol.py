"""Weakly supervised object localisation metrics, as the wsolevaluation protocol computes them.

The SCM paper (and TS-CAM before it) reports, for CUB-200-2011 and ILSVRC:

* **GT-known Loc**: the share of images whose box, taken from the map of the ground-truth
  class, has IoU >= 0.5 with a ground-truth box. The box comes from the *largest contour*
  of the thresholded map. This is wsolevaluation's MaxBoxAcc (IoU 0.5, one box per map).
* **Top-1 Loc** / **Top-5 Loc**: the same, counted only where the ground-truth class is the
  top-1 prediction / among the top 5 predictions.
* **Top-1 Cls**: classification accuracy.

Each localisation score is taken at its own best map threshold tau (0, 0.01, ..., 0.99).

Here the GT-known box always comes from the ground-truth class's map (wsolevaluation's
definition). The evaluation script released with SCM differs in two details: it resizes
with OpenCV's default bilinear interpolation, and its "GT-Known" takes the map of the
top-1 *predicted* class (its top-5 variant: any of the top 5). Interpolation aside, the
two GT-known definitions agree on every image whose top-1 prediction is right, and Top-1
and Top-5 Loc are defined alike.

wsolevaluation's second box metric, **MaxBoxAccV2**, is not in the SCM paper's table: it
takes the best box over *all contours* of the map and averages the best-threshold accuracy
over IoU 0.3, 0.5 and 0.7.

From map to boxes (``normalize_map`` then ``boxes_at_thresholds``):

1. The class map is converted to float64, resized to the image (bicubic) and min-max
   normalised to [0, 1]; a map that is constant after resizing becomes all zeros. A map
   containing NaN or inf is rejected (ValueError).
2. The normalised map is quantised to 8 bits, q = floor(255 * map) (numpy's uint8 cast).
3. At threshold tau a pixel is foreground when q > int(tau * max q) (strictly greater).
4. Each outer or inner contour of the foreground (OpenCV, full hierarchy) gives the box
   x0 = x, y0 = y, x1 = x + w, y1 = y + h from its bounding rectangle (x, y, w, h): one
   pixel wider and taller than the rectangle, except where clipped to width - 1 and
   height - 1. The largest contour is the one whose polygon (through the centres of its
   boundary pixels) encloses the largest area, the first on ties; a shape one pixel wide
   encloses 0.
5. No foreground at all gives the box [0, 0, 0, 0]: a constant or all-zero map scores the
   IoU of the top-left pixel with the ground truth.

Boxes are (x0, y0, x1, y1) in inclusive pixel coordinates: a box covers
(x1 - x0 + 1) * (y1 - y0 + 1) pixels, and IoU is computed on those areas. An image with
several ground-truth boxes is scored by its best-matching one.

    scores = BoxEvaluator(image_size=(H, W))
    scores.accumulate(class_maps, gt_boxes, gt_labels, logits)   # per batch
    scores.compute()

``compute()`` returns percentages (floats) under these keys:

==================== ==============================================================
``top1_cls``         top-1 classification accuracy (needs logits)
``top5_cls``         top-5 classification accuracy (needs logits, C >= 5)
``gt_known_loc``     GT-known Loc = MaxBoxAcc at IoU 0.5, largest contour
``maxboxacc``        the same number under wsolevaluation's name
``top1_loc``         Top-1 Loc, largest contour, IoU 0.5 (needs logits)
``top5_loc``         Top-5 Loc, largest contour, IoU 0.5 (needs logits, C >= 5)
``maxboxacc_v2``     MaxBoxAccV2: all contours, mean over IoU 0.3 / 0.5 / 0.7
``maxboxacc_v2_iou30``, ``_iou50``, ``_iou70``: its three terms
``best_threshold``   the tau (a fraction, not a percentage) at which gt_known_loc is
                     reached; the first such tau
==================== ==============================================================

Contours and resizing use OpenCV (``pip install opencv-python-headless``, part of the
``example`` and ``test`` extras), as the reference protocol does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["THRESHOLDS", "IOU_DELTAS", "BoxEvaluator", "box_iou", "boxes_at_thresholds", "normalize_map"]

THRESHOLDS = np.arange(0, 1, 0.01)     # map thresholds tau of the protocol
IOU_DELTAS = (30, 50, 70)              # IoU thresholds (percent) averaged by MaxBoxAccV2
_LOC_IOU = 0.5                         # IoU threshold of GT-known, Top-1 and Top-5 Loc
_NO_BOX = np.zeros((1, 4), dtype=np.int64)


def _as_boxes(boxes, name: str) -> np.ndarray:
    """Boxes as a float64 [k, 4] array, checked: non-negative, x1 >= x0 and y1 >= y0."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [4] or [k, 4] (x0, y0, x1, y1), got {list(arr.shape)}")
    arr = arr.reshape(-1, 4)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (arr < 0).any():
        raise ValueError(f"{name} has negative coordinates: boxes are (x0, y0, x1, y1) pixel indices")
    if (arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any():
        raise ValueError(f"{name} has a box with x1 < x0 or y1 < y0: boxes are (x0, y0, x1, y1), inclusive")
    return arr


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """IoU of every box of boxes_a [n, 4] with every box of boxes_b [m, 4] -> float64 [n, m].

    Boxes are (x0, y0, x1, y1) inclusive pixel coordinates (a single box may be given as a
    [4] sequence): area = (x1 - x0 + 1) * (y1 - y0 + 1), so [0, 0, 0, 0] is one pixel and
    two such boxes have IoU 1. Raises ValueError for a negative coordinate or x1 < x0."""
    a = _as_boxes(boxes_a, "boxes_a")
    b = _as_boxes(boxes_b, "boxes_b")
    ix = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    iy = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def normalize_map(cam, image_size) -> np.ndarray:
    """A class map [h, w] resized to image_size = (H, W) with bicubic interpolation, then
    min-max normalised: float64 [H, W] in [0, 1] whose maximum is exactly 1, or all zeros
    for a constant map. Computed in float64, as the reference protocol converts maps to
    float64 first. Raises ValueError if cam contains NaN or inf."""
    import cv2
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"cam must be a 2-D map [h, w], got shape {list(cam.shape)}")
    if not np.isfinite(cam).all():
        raise ValueError("cam contains NaN or inf")
    h, w = image_size
    resized = cv2.resize(cam, (int(w), int(h)), interpolation=cv2.INTER_CUBIC)
    low, high = resized.min(), resized.max()
    if low == high:
        return np.zeros_like(resized)
    resized -= low
    return resized / resized.max()


def _contour_boxes(scaled_map: np.ndarray, thresholds) -> list[tuple[np.ndarray, int]]:
    """Per threshold: (boxes of all contours [k, 4] int64, index of the largest contour);
    ([[0, 0, 0, 0]], 0) where nothing is foreground."""
    import cv2
    if not isinstance(scaled_map, np.ndarray) or scaled_map.ndim != 2:
        raise ValueError(f"scaled_map must be a 2-D numpy array, got {type(scaled_map).__name__} "
                         f"of shape {list(np.shape(scaled_map))}")
    if not np.issubdtype(scaled_map.dtype, np.floating):
        raise ValueError(f"scaled_map must be a floating-point map in [0, 1], got {scaled_map.dtype}")
    if np.isnan(scaled_map).any():
        raise ValueError("scaled_map contains NaN")
    if scaled_map.size and (scaled_map.min() < 0 or scaled_map.max() > 1):
        raise ValueError(f"scaled_map must lie in [0, 1] (normalize_map gives that), "
                         f"got min {scaled_map.min()} and max {scaled_map.max()}")
    height, width = scaled_map.shape
    quantised = (scaled_map * 255).astype(np.uint8)
    top = quantised.max() if quantised.size else np.uint8(0)
    out = []
    for tau in thresholds:
        mask = (quantised > int(tau * top)).astype(np.uint8)
        contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        if len(contours) == 0:
            out.append((_NO_BOX, 0))
            continue
        boxes = np.empty((len(contours), 4), dtype=np.int64)
        for k, contour in enumerate(contours):
            x, y, w, h = cv2.boundingRect(contour)
            boxes[k] = (x, y, min(x + w, width - 1), min(y + h, height - 1))
        largest = int(np.argmax([cv2.contourArea(c) for c in contours]))
        out.append((boxes, largest))
    return out


def boxes_at_thresholds(scaled_map: np.ndarray, thresholds=THRESHOLDS, *,
                        all_contours: bool = False) -> list[np.ndarray]:
    """Boxes of a min-max normalised map at each threshold.

    Args:
        scaled_map: float [H, W] in [0, 1], e.g. from normalize_map.
        thresholds: the thresholds tau, fractions of the map's maximum.
        all_contours: False (GT-known / Top-1 / Top-5 Loc, MaxBoxAcc): only the box of
            the largest contour. True (MaxBoxAccV2): the box of every contour.

    Returns:
        One int64 array per threshold: [1, 4] (largest contour) or [k, 4] (all contours)
        boxes (x0, y0, x1, y1) in inclusive pixel coordinates of the map; [[0, 0, 0, 0]]
        where no pixel is foreground. See the module docstring for the exact rule.
    Raises ValueError for a NaN map, a map outside [0, 1] or not 2-D.
    """
    per_tau = _contour_boxes(scaled_map, thresholds)
    if all_contours:
        return [boxes for boxes, _ in per_tau]
    return [boxes[largest:largest + 1] for boxes, largest in per_tau]


class BoxEvaluator:
    """Accumulates, per image and threshold, the IoU of the largest-contour box and the best
    IoU over all contour boxes with the ground truth, and the classification; compute()
    gives the percentages listed in the module docstring.

    Args:
        image_size: (H, W) of the images; ground-truth boxes are in its pixels.
        thresholds: the map thresholds tau (default 0, 0.01, ..., 0.99).
    """

    def __init__(self, image_size, thresholds=THRESHOLDS):
        self.image_size = tuple(int(v) for v in image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (H, W) with H, W >= 1, got {image_size}")
        self.thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if self.thresholds.size == 0:
            raise ValueError("thresholds must not be empty")
        self.iou_largest = []   # per image: [T] IoU of the largest-contour box
        self.iou_any = []       # per image: [T] best IoU over all contour boxes
        self.top1 = []
        self.top5 = []
        self.num_classes = None

    def _check_batch(self, n, gt_boxes, gt_labels, logits):
        if len(gt_boxes) != n:
            raise ValueError(f"gt_boxes has {len(gt_boxes)} entries for {n} images")
        if logits is not None and len(np.asarray(gt_labels).reshape(-1)) != n:
            raise ValueError(f"gt_labels has {len(np.asarray(gt_labels).reshape(-1))} entries for {n} images")

    def accumulate(self, class_maps, gt_boxes, gt_labels=None, logits=None):
        """class_maps [B, h, w]: each image's map of its ground-truth class, any real
        dtype (resized to image_size by normalize_map). gt_boxes: per image a [k, 4] (or
        [4]) array of ground-truth boxes in image pixels. gt_labels [B] integer classes and
        logits [B, C], or both None (localisation only). Raises ValueError for a NaN map."""
        class_maps = np.asarray(class_maps)
        if class_maps.ndim != 3:
            raise ValueError(f"class_maps must have shape [B, h, w], got {list(class_maps.shape)}")
        self._check_batch(len(class_maps), gt_boxes, gt_labels, logits)
        for i, cam in enumerate(class_maps):
            gt = _as_boxes(gt_boxes[i], f"gt_boxes[{i}]")
            scaled = normalize_map(cam, self.image_size)
            per_tau = _contour_boxes(scaled, self.thresholds)
            iou = box_iou(np.concatenate([boxes for boxes, _ in per_tau]), gt).max(1)  # one IoU per box
            start = np.cumsum([0] + [len(boxes) for boxes, _ in per_tau])
            self.iou_largest.append([iou[s + k] for s, (_, k) in zip(start, per_tau)])
            self.iou_any.append([iou[s:e].max() for s, e in zip(start[:-1], start[1:])])
        if logits is not None:
            self.accumulate_classification(gt_labels, logits)

    def accumulate_boxes(self, boxes, gt_boxes, gt_labels=None, logits=None):
        """For fixed-box baselines: one predicted box per image ([B, 4]), the same at every
        threshold and for both contour rules."""
        boxes = _as_boxes(boxes, "boxes")
        self._check_batch(len(boxes), gt_boxes, gt_labels, logits)
        for i, b in enumerate(boxes):
            iou = box_iou(b, _as_boxes(gt_boxes[i], f"gt_boxes[{i}]")).max()
            self.iou_largest.append([iou] * len(self.thresholds))
            self.iou_any.append([iou] * len(self.thresholds))
        if logits is not None:
            self.accumulate_classification(gt_labels, logits)

    def accumulate_classification(self, gt_labels, logits):
        """gt_labels [B] integer classes, logits [B, C] scores (higher is more likely).
        Ties are broken towards the lower class index."""
        labels = np.asarray(gt_labels).reshape(-1)
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"logits must have shape [B, C] with B = {labels.shape[0]} (gt_labels), "
                             f"got {list(logits.shape)}")
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(f"logits has {logits.shape[1]} classes, earlier batches had {self.num_classes}")
        if ((labels < 0) | (labels >= logits.shape[1])).any():
            raise ValueError(f"gt_labels must lie in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}")
        self.num_classes = logits.shape[1]
        order = np.argsort(-logits, axis=1, kind="stable")
        self.top1.extend(order[:, 0] == labels)
        self.top5.extend((order[:, :5] == labels[:, None]).any(1))

    def compute(self) -> dict:
        """Percentages (see the module docstring for every key); best_threshold is a tau."""
        if not self.iou_largest:
            raise ValueError("compute() called before any accumulate")
        if self.top1 and len(self.top1) != len(self.iou_largest):
            raise ValueError(f"{len(self.top1)} images have logits but {len(self.iou_largest)} have boxes: "
                             "pass logits with every batch or with none")
        largest = np.asarray(self.iou_largest)            # [images, thresholds]
        any_contour = np.asarray(self.iou_any)

        def max_over_tau(hit):                           # hit: [images, thresholds] bool
            return 100.0 * hit.mean(0).max()

        hit = largest >= _LOC_IOU
        result = {"gt_known_loc": max_over_tau(hit)}
        result["maxboxacc"] = result["gt_known_loc"]
        result["best_threshold"] = self.thresholds[int(hit.mean(0).argmax())]
        for delta in IOU_DELTAS:
            result[f"maxboxacc_v2_iou{delta}"] = max_over_tau(any_contour >= delta / 100)
        result["maxboxacc_v2"] = np.mean([result[f"maxboxacc_v2_iou{d}"] for d in IOU_DELTAS])
        if self.top1:
            top1 = np.asarray(self.top1)[:, None]
            result["top1_cls"] = 100.0 * top1.mean()
            result["top1_loc"] = max_over_tau(hit & top1)
            if self.num_classes >= 5:
                top5 = np.asarray(self.top5)[:, None]
                result["top5_cls"] = 100.0 * top5.mean()
                result["top5_loc"] = max_over_tau(hit & top5)
        return {k: float(v) for k, v in result.items()}
