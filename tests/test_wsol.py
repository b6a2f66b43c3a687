"""WSOL metrics (scm_ops.wsol) on hand-computed cases."""
import numpy as np
import pytest

from scm_ops.wsol import BoxEvaluator, box_iou, boxes_at_thresholds, normalize_map


def test_iou_inclusive_pixels():
    # identical boxes
    assert box_iou([0, 0, 9, 9], [0, 0, 9, 9])[0, 0] == 1.0
    # touching boxes share the boundary column: 10 x 1 pixels of 10 x 10 + 10 x 10 - 10
    assert box_iou([0, 0, 9, 9], [9, 0, 18, 9])[0, 0] == pytest.approx(10 / 190)
    # adjacent, not overlapping
    assert box_iou([0, 0, 9, 9], [10, 0, 19, 9])[0, 0] == 0.0
    # a single pixel box inside a 2 x 2 box
    assert box_iou([0, 0, 0, 0], [0, 0, 1, 1])[0, 0] == pytest.approx(1 / 4)
    # many against many
    assert box_iou(np.array([[0, 0, 3, 3], [0, 0, 1, 1]]), np.array([[0, 0, 3, 3]])).tolist() == [[1.0], [0.25]]


def test_boxes_of_all_contours_and_empty_map():
    cam = np.zeros((20, 30), np.float32)
    cam[2:5, 3:7] = 1.0       # rows 2-4, cols 3-6
    cam[10:18, 20:25] = 0.5   # rows 10-17, cols 20-24
    low, high = boxes_at_thresholds(cam, [0.4, 0.9])
    assert sorted(map(tuple, low.astype(int).tolist())) == [(3, 2, 6, 4), (20, 10, 24, 17)]
    assert high.astype(int).tolist() == [[3, 2, 6, 4]]
    (empty,) = boxes_at_thresholds(np.zeros((5, 5), np.float32), [0.5])
    assert empty.tolist() == [[0, 0, 0, 0]]


def test_normalize_map_constant_is_zero_and_range():
    assert np.all(normalize_map(np.full((4, 4), 3.0), (8, 8)) == 0)
    m = normalize_map(np.arange(16, dtype=np.float32).reshape(4, 4), (8, 8))
    assert m.shape == (8, 8) and m.min() == 0 and m.max() == pytest.approx(1)


def test_evaluator_scores_by_hand():
    size = (32, 32)
    cam_good = np.zeros((32, 32), np.float32)
    cam_good[8:16, 8:16] = 1     # exactly the ground-truth box
    cam_bad = np.zeros((32, 32), np.float32)
    cam_bad[24:32, 24:32] = 1    # disjoint from it
    gt = [np.array([[8, 8, 15, 15]])] * 2
    ev = BoxEvaluator(size)
    logits = np.array([[5.0, 0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0, 0]])
    ev.accumulate(np.stack([cam_good, cam_bad]), gt, np.array([0, 0]), logits)
    r = ev.compute()
    assert r["gt_known_loc"] == 50.0       # one of two images localised
    assert r["top1_cls"] == 50.0           # image 2 predicted class 1
    assert r["top1_loc"] == 50.0
    assert r["top5_loc"] == 50.0           # class 0 is in image 2's top 5 but its box misses
    assert r["maxboxacc_v2"] == 50.0


def test_fixed_box_floor():
    ev = BoxEvaluator((64, 64))
    ev.accumulate_boxes([(0, 0, 63, 63)] * 2, [np.array([[0, 0, 31, 31]]), np.array([[0, 0, 63, 63]])])
    r = ev.compute()
    assert r["gt_known_loc"] == 50.0       # IoU 0.25 and 1.0
    assert r["maxboxacc_v2"] == pytest.approx((50 + 50 + 50) / 3)
    assert "top1_cls" not in r
