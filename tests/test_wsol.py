"""WSOL metrics (scm_ops.wsol): wsolevaluation's published unit-test expectations, then
hand-computed evaluator cases.

The hand-computed cases use binary maps at the image size (normalize_map leaves them as they
are), so each box follows from the rule alone: a block of map pixels in rows r0..r1 and
columns c0..c1 gives the box (c0, r0, c1 + 1, r1 + 1), clipped to the image.
"""
import numpy as np
import pytest

from scm_ops.wsol import BoxEvaluator, box_iou, boxes_at_thresholds, normalize_map

SIZE = 32
GT = np.array([[8, 8, 15, 15]])            # 8 x 8 = 64 pixels


def block(rows, cols, value=1.0, size=SIZE):
    """A map of zeros with `value` on rows[0]..rows[1], cols[0]..cols[1] (inclusive)."""
    m = np.zeros((size, size), np.float32)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = value
    return m


# Maps whose box has, against GT, an IoU in each band (box, intersection and IoU by hand):
HIT_79 = block((8, 15), (8, 15))     # box [8, 8, 16, 16], 81 px, inter 64: 64 / 81   = 0.790
HIT_55 = block((8, 15), (8, 19))     # box [8, 8, 20, 16], 117 px, inter 64: 64 / 117 = 0.547
MISS_49 = block((8, 15), (10, 17))   # box [10, 8, 18, 16], 81 px, inter 48: 48 / 97  = 0.495
MISS_38 = block((8, 15), (11, 18))   # box [11, 8, 19, 16], 81 px, inter 40: 40 / 105 = 0.381
IOU_79, IOU_55, IOU_49, IOU_38 = 64 / 81, 64 / 117, 48 / 97, 40 / 105
THRESHOLDS_5 = np.arange(0, 1, 0.2)


# ------------------------------------------------------------------ wsolevaluation's unit-test facts
def test_published_iou_cases():
    ious = box_iou(np.zeros((3, 4), int), np.zeros((5, 4), int))   # one-pixel boxes at the origin
    assert ious.dtype == np.float64 and ious.shape == (3, 5) and (ious == 1.0).all()
    eye = np.array([[1, 1, 3, 3], [4, 4, 5, 5]])
    assert (box_iou(eye, eye) == np.eye(2)).all()
    assert box_iou([[1, 2, 5, 6]], [[3, 1, 4, 5]])[0, 0] == pytest.approx(8 / 27, abs=1e-12)
    with pytest.raises(ValueError, match="boxes_a has a box with x1 < x0"):
        box_iou([[1, 1, 0, 0]], [[1, 1, 2, 2]])


UNIMODAL = np.array([[0.0, 0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.4, 0.4, 0.4, 0.6],
                     [0.0, 0.4, 1.0, 0.8, 0.6],
                     [0.0, 0.4, 0.4, 0.4, 0.6]])
MULTIMODAL = np.array([[0.4, 0.0, 0.2, 0.2, 0.2],
                       [0.4, 0.4, 0.0, 0.4, 0.0],
                       [0.0, 0.0, 0.0, 0.4, 0.0],
                       [1.0, 0.6, 0.8, 0.2, 0.2]])


@pytest.mark.parametrize("scoremap, expected", [
    (np.zeros((3, 3)), [[0, 0, 0, 0]] * 5),
    (UNIMODAL, [[1, 1, 4, 3], [1, 1, 4, 3], [2, 1, 4, 3], [2, 2, 4, 3], [2, 2, 3, 3]]),
    (MULTIMODAL, [[0, 0, 4, 3], [0, 0, 2, 2], [0, 3, 3, 3], [2, 3, 3, 3], [0, 3, 1, 3]]),
], ids=["degenerate", "unimodal", "multimodal"])
def test_published_boxes_of_largest_contour(scoremap, expected):
    """wsolevaluation's boxes (x0, y0, x1, y1) at thresholds 0, 0.2, ..., 0.8."""
    for dtype in (np.float64, np.float32):
        boxes = boxes_at_thresholds(scoremap.astype(dtype), THRESHOLDS_5)
        assert all(b.shape == (1, 4) for b in boxes)
        assert [b[0].tolist() for b in boxes] == expected


def test_published_nan_map_raises():
    with pytest.raises(ValueError, match="scaled_map contains NaN"):
        boxes_at_thresholds(np.full((3, 3), np.nan), THRESHOLDS_5)


# ------------------------------------------------------------------ boxes, by hand
def test_all_contours_of_the_multimodal_map():
    """At 0.2 (uint8 threshold 51) the foreground is the 0.4+ pixels: the 3-pixel blob at the
    top left, box [0, 0, 2, 2], and an L from (x3, y1) down to the bottom row, box [0, 1, 4, 3]
    (y1 = 1 + 3 clipped to 3). At 0.6 (threshold 153: 0.8 and 1.0) two single pixels whose
    boxes are [0, 3, 1, 3] and [2, 3, 3, 3]; the largest contour is the first on the tie."""
    boxes = boxes_at_thresholds(MULTIMODAL, [0.2, 0.6], all_contours=True)
    assert sorted(map(tuple, boxes[0].tolist())) == [(0, 0, 2, 2), (0, 1, 4, 3)]
    assert sorted(map(tuple, boxes[1].tolist())) == [(0, 3, 1, 3), (2, 3, 3, 3)]


def test_box_is_one_pixel_wider_and_clipped_at_the_border():
    (box,) = boxes_at_thresholds(block((2, 4), (3, 6), size=20), [0.5])
    assert box.tolist() == [[3, 2, 7, 5]]
    (box,) = boxes_at_thresholds(block((10, 19), (15, 19), size=20), [0.5])
    assert box.tolist() == [[15, 10, 19, 19]]      # x + w = 20, y + h = 20, clipped to 19


def test_quantisation_and_strict_threshold():
    m = np.zeros((10, 10))
    m[1, 1] = 1.0
    m[5:7, 5:7] = 0.5                 # uint8 127
    m[8, 8] = 0.0039                  # uint8 0: background even at tau = 0 (0 > 0 is false)
    low, at_half, above_half = boxes_at_thresholds(m, [0.0, 0.498, 0.499], all_contours=True)
    # tau = 0.498: int(0.498 * 255) = 126 < 127, the 0.5 block is foreground;
    # tau = 0.499: int(127.245) = 127, and 127 > 127 is false.
    assert sorted(map(tuple, low.tolist())) == [(1, 1, 2, 2), (5, 5, 7, 7)]
    assert sorted(map(tuple, at_half.tolist())) == [(1, 1, 2, 2), (5, 5, 7, 7)]
    assert above_half.tolist() == [[1, 1, 2, 2]]


@pytest.mark.parametrize("value", [0.0, 0.7], ids=["empty", "constant"])
def test_empty_and_constant_maps_give_the_origin_box(value):
    # At the image size: bicubic upsampling of a constant float32 map is not exactly
    # constant (rounding), and the min-max then stretches that noise, as wsolevaluation does.
    scaled = normalize_map(np.full((SIZE, SIZE), value), (SIZE, SIZE))
    assert (scaled == 0).all()
    assert all(b.tolist() == [[0, 0, 0, 0]] for b in boxes_at_thresholds(scaled, THRESHOLDS_5))
    # the origin box is one pixel: IoU 1/2 with a two-pixel box there, 1/1024 with the image
    ev = BoxEvaluator((SIZE, SIZE))
    ev.accumulate(np.full((2, SIZE, SIZE), value), [[[0, 0, 1, 0]], [[0, 0, SIZE - 1, SIZE - 1]]])
    r = ev.compute()
    assert r["gt_known_loc"] == 50.0 and r["maxboxacc_v2_iou50"] == 50.0 and r["maxboxacc_v2_iou30"] == 50.0


def test_normalize_map_range_and_nan():
    m = normalize_map(np.arange(16, dtype=np.float32).reshape(4, 4), (8, 8))
    assert m.shape == (8, 8) and m.dtype == np.float64 and m.min() == 0 and m.max() == 1
    with pytest.raises(ValueError, match="cam contains NaN"):
        normalize_map(np.array([[0.0, np.nan], [1.0, 2.0]]), (8, 8))


# ------------------------------------------------------------------ the evaluator, by hand
def test_evaluator_iou_bands_and_ranks():
    """Five images, each with a role; ranks of the label among 7 classes.

    image  IoU    band       label rank
    0      0.790  >= 0.7     1          localised, classified
    1      0.547  0.5-0.7    3          localised, misclassified, in the top 5
    2      0.790  >= 0.7     7          localised, not in the top 5
    3      0.495  0.3-0.5    1          classified, not localised
    4      0.381  0.3-0.5    1          classified, not localised
    """
    maps = np.stack([HIT_79, HIT_55, HIT_79, MISS_49, MISS_38])
    ranked = np.array([6.0, 5, 4, 3, 2, 1, 0])         # class k has rank k + 1
    logits = np.stack([np.roll(ranked, shift) for shift in (0, 2, 6, 0, 0)])
    labels = np.zeros(5, int)
    ev = BoxEvaluator((SIZE, SIZE))
    ev.accumulate(maps, [GT] * 5, labels, logits)
    r = ev.compute()
    assert r["gt_known_loc"] == r["maxboxacc"] == 60.0      # images 0, 1, 2
    assert r["top1_cls"] == 60.0                            # images 0, 3, 4
    assert r["top5_cls"] == 80.0                            # and 1
    assert r["top1_loc"] == 20.0                            # image 0 only
    assert r["top5_loc"] == 40.0                            # images 0 and 1
    assert r["maxboxacc_v2_iou30"] == 100.0
    assert r["maxboxacc_v2_iou50"] == 60.0
    assert r["maxboxacc_v2_iou70"] == 40.0                  # images 0, 2
    assert r["maxboxacc_v2"] == pytest.approx(200 / 3, abs=1e-12)
    assert r["best_threshold"] == 0.0                       # every tau scores the same here


def test_iou_band_edges_by_hand():
    assert box_iou([[8, 8, 20, 16]], GT)[0, 0] == pytest.approx(IOU_55, abs=1e-15)
    got = [box_iou(boxes_at_thresholds(m, [0.5])[0], GT)[0, 0] for m in (HIT_79, HIT_55, MISS_49, MISS_38)]
    assert got == pytest.approx([IOU_79, IOU_55, IOU_49, IOU_38], abs=1e-15)


def test_one_threshold_for_all_images():
    """Two maps with a faint ring (0.3, uint8 76) around a bright core (1.0). Image A's ring box
    hits the ground truth and its core box does not; image B the other way round. The ring is
    foreground for tau <= 0.29 (int(tau * 255) <= 73 < 76), the core alone from 0.30 on. No
    single tau localises both, so GT-known is 50, not 100."""
    a = block((4, 20), (4, 20), 0.3)
    a[4:7, 4:7] = 1.0                   # ring box [4, 4, 21, 21] = GT A; core box [4, 4, 7, 7]
    b = block((2, 29), (2, 29), 0.3)
    b[10:18, 10:18] = 1.0               # ring box [2, 2, 30, 30]; core box [10, 10, 18, 18] = GT B
    ev = BoxEvaluator((SIZE, SIZE))
    ev.accumulate(np.stack([a, b]), [[[4, 4, 21, 21]], [[10, 10, 18, 18]]])
    r = ev.compute()
    assert r["gt_known_loc"] == 50.0 and r["best_threshold"] == 0.0
    ev_b = BoxEvaluator((SIZE, SIZE))
    ev_b.accumulate(b[None], [[[10, 10, 18, 18]]])
    assert ev_b.compute()["best_threshold"] == pytest.approx(0.30)


def test_largest_contour_for_gt_known_all_contours_for_v2():
    """A large blob far from the ground truth and a small one on it: the largest contour
    misses (GT-known 0), the best of all contours hits (MaxBoxAccV2 terms 100)."""
    m = block((20, 31), (20, 31))       # 12 x 12
    m[8:16, 8:15] = 1.0                 # box [8, 8, 15, 16] against GT: 64 / 72
    ev = BoxEvaluator((SIZE, SIZE))
    ev.accumulate(m[None], [GT])
    r = ev.compute()
    assert r["gt_known_loc"] == 0.0 and r["maxboxacc_v2"] == 100.0


def test_several_ground_truth_boxes_take_the_best():
    ev = BoxEvaluator((SIZE, SIZE))
    ev.accumulate(HIT_79[None], [np.array([[0, 0, 3, 3], [8, 8, 15, 15]])])
    assert ev.compute()["gt_known_loc"] == 100.0


def test_fixed_box_floor():
    ev = BoxEvaluator((64, 64))
    ev.accumulate_boxes([(0, 0, 63, 63)] * 2, [np.array([[0, 0, 31, 31]]), np.array([[0, 0, 63, 63]])])
    r = ev.compute()
    assert r["gt_known_loc"] == 50.0       # IoU 0.25 and 1.0
    assert r["maxboxacc_v2"] == 50.0     # 0.25 < 0.3: 50 at every IoU threshold
    assert "top1_cls" not in r and "top1_loc" not in r


def test_fewer_than_five_classes_has_no_top5():
    ev = BoxEvaluator((SIZE, SIZE))
    ev.accumulate(HIT_79[None], [GT], np.array([1]), np.array([[0.0, 2.0, 1.0, 0.5]]))
    r = ev.compute()
    assert r["top1_loc"] == 100.0 and "top5_loc" not in r and "top5_cls" not in r


def test_nan_class_map_raises():
    ev = BoxEvaluator((SIZE, SIZE))
    with pytest.raises(ValueError, match="cam contains NaN"):
        ev.accumulate(np.full((1, 4, 4), np.nan), [GT])


@pytest.mark.parametrize("call, match", [
    (lambda ev: ev.accumulate(np.zeros((4, 4)), [GT]), r"class_maps must have shape \[B, h, w\]"),
    (lambda ev: ev.accumulate(np.zeros((2, 4, 4)), [GT]), "gt_boxes has 1 entries for 2 images"),
    (lambda ev: ev.accumulate(np.zeros((1, 4, 4)), [[[3, 0, 1, 1]]]), r"gt_boxes\[0\] has a box with x1 < x0"),
    (lambda ev: ev.accumulate(np.zeros((1, 4, 4)), [GT], [0], np.zeros(3)), r"logits must have shape \[B, C\]"),
    (lambda ev: ev.accumulate(np.zeros((1, 4, 4)), [GT], [5], np.zeros((1, 3))), r"gt_labels must lie in \[0, 3\)"),
    (lambda ev: ev.compute(), "before any accumulate"),
    (lambda ev: boxes_at_thresholds(np.full((3, 3), 2.0), [0.5]), r"scaled_map must lie in \[0, 1\]"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(BoxEvaluator((SIZE, SIZE)))
