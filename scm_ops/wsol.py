"""Weakly supervised object localisation metrics (SPEC section 6, the wsolevaluation protocol).

Boxes are (x0, y0, x1, y1) in inclusive pixel coordinates. Contours and resizing use
OpenCV (``pip install opencv-python-headless``, part of the ``example`` extra), as the
reference protocol does.

    scores = BoxEvaluator(image_size=(H, W))
    scores.accumulate(class_maps, gt_boxes, gt_labels, logits)   # per batch
    scores.compute()  # {"top1_cls", "top1_loc", "top5_loc", "gt_known_loc", "maxboxacc_v2", ...}
"""
from __future__ import annotations

import numpy as np

THRESHOLDS = np.arange(0, 1, 0.01)
IOU_DELTAS = (30, 50, 70)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [n, 4] with every box in b [m, 4] -> [n, m], inclusive pixels:
    area = (x1 - x0 + 1) * (y1 - y0 + 1)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0 + 1, 0, None) * np.clip(y1 - y0 + 1, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def normalize_map(cam: np.ndarray, image_size) -> np.ndarray:
    """Resize a class map to (H, W) with bicubic interpolation, then min-max to [0, 1]
    (a constant map becomes 0)."""
    import cv2
    h, w = image_size
    resized = cv2.resize(np.asarray(cam, dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    resized -= resized.min()
    top = resized.max()
    return resized / top if top > 0 else np.zeros_like(resized)


def boxes_at_thresholds(scaled_map: np.ndarray, thresholds=THRESHOLDS) -> list[np.ndarray]:
    """For each threshold tau: the bounding boxes [k, 4] of all contours of map >= tau * max
    (the map is already min-max normalised, so max is 1). A threshold with no foreground
    gives the single box [0, 0, 0, 0], as the reference protocol does."""
    import cv2
    h, w = scaled_map.shape
    top = scaled_map.max()
    out = []
    for tau in thresholds:
        mask = (scaled_map >= tau * top).astype(np.uint8) if top > 0 \
            else np.zeros_like(scaled_map, dtype=np.uint8)
        contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        boxes = []
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            boxes.append([x, y, min(x + bw - 1, w - 1), min(y + bh - 1, h - 1)])
        out.append(np.array(boxes if boxes else [[0, 0, 0, 0]], dtype=np.float64))
    return out


class BoxEvaluator:
    """Accumulates, per image and threshold, the best IoU over all contour boxes against the
    ground-truth boxes, and the classification; compute() gives percentages:

    top1_cls; gt_known_loc (IoU >= 0.5 with the ground-truth class map, best threshold);
    top1_loc / top5_loc (and the class among the top 1 / 5; top5 only when C >= 5);
    maxboxacc_v2 (mean over delta 30/50/70 of the best-threshold share with IoU >= delta);
    best_threshold (for gt_known_loc).
    """

    def __init__(self, image_size, thresholds=THRESHOLDS):
        self.image_size = tuple(image_size)
        self.thresholds = np.asarray(thresholds)
        self.ious = []       # [images, thresholds]
        self.top1 = []
        self.top5 = []
        self.num_classes = None

    def accumulate(self, class_maps, gt_boxes, gt_labels, logits=None):
        """class_maps [B, h, w] (maps of the ground-truth class), gt_boxes: per image an
        array [k, 4] of boxes in image pixels, gt_labels [B], logits [B, C] or None."""
        class_maps = np.asarray(class_maps, dtype=np.float32)
        for i, cam in enumerate(class_maps):
            per_tau = boxes_at_thresholds(normalize_map(cam, self.image_size), self.thresholds)
            gt = np.asarray(gt_boxes[i], dtype=np.float64).reshape(-1, 4)
            self.ious.append([box_iou(b, gt).max() for b in per_tau])
        if logits is not None:
            self.accumulate_classification(gt_labels, logits)

    def accumulate_boxes(self, boxes, gt_boxes, gt_labels=None, logits=None):
        """For fixed-box baselines: one predicted box per image, the same at every threshold."""
        for b, gt in zip(boxes, gt_boxes):
            iou = box_iou(np.asarray(b).reshape(1, 4), np.asarray(gt).reshape(-1, 4)).max()
            self.ious.append([iou] * len(self.thresholds))
        if logits is not None:
            self.accumulate_classification(gt_labels, logits)

    def accumulate_classification(self, gt_labels, logits):
        labels = np.asarray(gt_labels)
        logits = np.asarray(logits)
        self.num_classes = logits.shape[1]
        order = np.argsort(-logits, axis=1)
        self.top1.extend(order[:, 0] == labels)
        self.top5.extend((order[:, :5] == labels[:, None]).any(1))

    def compute(self) -> dict:
        ious = np.asarray(self.ious)                       # [n, T]
        hit50 = ious >= 0.5
        result = {"gt_known_loc": 100 * hit50.mean(0).max(),
                  "best_threshold": float(self.thresholds[hit50.mean(0).argmax()]),
                  "maxboxacc_v2": float(np.mean([100 * (ious >= d / 100).mean(0).max() for d in IOU_DELTAS]))}
        if self.top1:
            top1 = np.asarray(self.top1)[:, None]
            result["top1_cls"] = 100 * top1.mean()
            result["top1_loc"] = 100 * (hit50 & top1).mean(0).max()
            if self.num_classes >= 5:
                result["top5_loc"] = 100 * (hit50 & np.asarray(self.top5)[:, None]).mean(0).max()
        return {k: float(v) for k, v in result.items()}
