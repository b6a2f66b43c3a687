"""The example's readers of CUB-200-2011 and of wsolevaluation's metadata, on miniature folders
written here (images of different sizes, PNG and JPEG), and a tiny run of the trainer on each."""
import json
import os
import sys

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
import datasets  # noqa: E402

# (relative path, class, width, height, boxes as x0, y0, x1, y1 in original pixels)
IMAGES = [
    ("001.Red/red_1.jpg", 0, 120, 80, [(10, 20, 59, 59)]),
    ("001.Red/red_2.png", 0, 64, 96, [(0, 0, 63, 47)]),
    ("002.Blue/blue_1.jpg", 1, 200, 150, [(100, 30, 199, 149)]),
    ("002.Blue/blue_2.png", 1, 90, 90, [(5, 5, 40, 40), (50, 50, 89, 89)]),
    ("003.Green/green_1.png", 2, 77, 130, [(20, 60, 70, 120)]),
    ("003.Green/green_2.jpg", 2, 150, 100, [(30, 10, 120, 90)]),
]
TEST = {1, 3, 4}   # indices in the test split


def _write_images(root):
    rng = np.random.default_rng(0)
    for path, label, w, h, boxes in IMAGES:
        img = (rng.uniform(0, 60, (h, w, 3))).astype(np.uint8)
        for x0, y0, x1, y1 in boxes:       # the object: a bright rectangle in the class's channel
            img[y0:y1 + 1, x0:x1 + 1, 2 - label] = 230
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        assert cv2.imwrite(os.path.join(root, path), img)


def make_cub(root):
    """CUB-200-2011's own layout; one box per image there, so multi-box images keep their first."""
    _write_images(os.path.join(root, "images"))
    with open(os.path.join(root, "images.txt"), "w") as f:
        f.writelines(f"{i + 1} {p}\n" for i, (p, *_) in enumerate(IMAGES))
    with open(os.path.join(root, "image_class_labels.txt"), "w") as f:
        f.writelines(f"{i + 1} {c + 1}\n" for i, (_, c, *_) in enumerate(IMAGES))
    with open(os.path.join(root, "train_test_split.txt"), "w") as f:
        f.writelines(f"{i + 1} {0 if i in TEST else 1}\n" for i in range(len(IMAGES)))
    with open(os.path.join(root, "bounding_boxes.txt"), "w") as f:   # x y width height, floats
        f.writelines(f"{i + 1} {b[0][0]:.1f} {b[0][1]:.1f} {b[0][2] - b[0][0]:.1f} {b[0][3] - b[0][1]:.1f}\n"
                     for i, (*_, b) in enumerate(IMAGES))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("1 001.Red\n2 002.Blue\n3 003.Green\n")


def make_wsol(metadata, data):
    """wsolevaluation's layout: one folder per split, image ids relative to the data root."""
    _write_images(os.path.join(data, "images"))
    for split, members in (("train", [i for i in range(len(IMAGES)) if i not in TEST]), ("test", sorted(TEST))):
        folder = os.path.join(metadata, split)
        os.makedirs(folder)
        rows = [IMAGES[i] for i in members]
        with open(os.path.join(folder, "image_ids.txt"), "w") as f:
            f.writelines(f"images/{p}\n" for p, *_ in rows)
        with open(os.path.join(folder, "class_labels.txt"), "w") as f:
            f.writelines(f"images/{p},{c}\n" for p, c, *_ in rows)
        with open(os.path.join(folder, "image_sizes.txt"), "w") as f:
            f.writelines(f"images/{p},{w},{h}\n" for p, _, w, h, _ in rows)
        with open(os.path.join(folder, "localization.txt"), "w") as f:
            f.writelines(f"images/{p},{x0},{y0},{x1},{y1}\n" for p, *_, boxes in rows for x0, y0, x1, y1 in boxes)


def _expected(index, size, first_only):
    _, label, w, h, boxes = IMAGES[index]
    boxes = boxes[:1] if first_only else boxes
    b = np.array(boxes, dtype=np.float64) * [size / w, size / h, size / w, size / h]
    return label, np.floor(b).clip(0, size - 1)


@pytest.mark.parametrize("layout", ["cub", "wsol"])
def test_reader_gives_resized_images_labels_and_rescaled_boxes(tmp_path, layout):
    size = 48
    if layout == "cub":
        make_cub(tmp_path)
        splits = datasets.cub_splits(str(tmp_path), size)
    else:
        make_wsol(tmp_path / "meta", tmp_path / "data")
        splits = datasets.wsol_splits(str(tmp_path / "meta"), str(tmp_path / "data"), size)
    assert len(splits["train"]) == 3 and len(splits["test"]) == 3
    assert len(splits["train"].classes) == 3
    for split, members in (("train", [0, 2, 5]), ("test", [1, 3, 4])):
        for item, index in zip(splits[split], members):
            image, label, boxes = item
            exp_label, exp_boxes = _expected(index, size, first_only=layout == "cub")
            assert image.shape == (3, size, size) and image.dtype.is_floating_point
            assert 0 <= float(image.min()) and float(image.max()) <= 1
            assert label == exp_label
            np.testing.assert_array_equal(boxes, exp_boxes)
            # the object's bright channel sits inside its rescaled box (away from the edges)
            x0, y0, x1, y1 = boxes[0].astype(int)
            inside = image[label, y0 + 2:y1 - 1, x0 + 2:x1 - 1]   # BGR channel 2 - label on disk
            assert float(inside.mean()) > 0.7


def test_cub_box_is_x_y_width_height(tmp_path):
    make_cub(tmp_path)
    item = datasets.cub_splits(str(tmp_path), 200)["train"][1]      # 002.Blue/blue_1.jpg, 200 x 150
    np.testing.assert_array_equal(item[2], [[100, 40, 199, 198]])    # y scaled by 200 / 150, floored


def test_readers_name_what_is_missing_or_malformed(tmp_path):
    make_wsol(tmp_path / "meta", tmp_path / "data")
    os.remove(tmp_path / "meta" / "test" / "localization.txt")
    with pytest.raises(FileNotFoundError, match="localization.txt"):
        datasets.wsol_splits(str(tmp_path / "meta"), str(tmp_path / "data"), 32)
    (tmp_path / "meta" / "test" / "localization.txt").write_text("images/x.png,m.png,ignore.png\n")
    with pytest.raises(ValueError, match="mask"):
        datasets.wsol_splits(str(tmp_path / "meta"), str(tmp_path / "data"), 32)
    with pytest.raises(FileNotFoundError, match="images.txt"):
        datasets.cub_splits(str(tmp_path / "nowhere"), 32)
    wrong = tmp_path / "sizes"
    make_wsol(wrong / "meta", wrong / "data")
    sizes = wrong / "meta" / "train" / "image_sizes.txt"
    sizes.write_text(sizes.read_text().replace(",120,80", ",121,80"))
    with pytest.raises(ValueError, match="121 x 80"):
        datasets.wsol_splits(str(wrong / "meta"), str(wrong / "data"), 32)["train"][0]


@pytest.mark.parametrize("layout", ["cub", "wsol"])
def test_trainer_runs_end_to_end_on_each_layout(tmp_path, layout, monkeypatch):
    import train_wsol
    if layout == "cub":
        make_cub(tmp_path / "cub")
        args = ["--dataset", "cub", "--data-root", str(tmp_path / "cub")]
    else:
        make_wsol(tmp_path / "meta", tmp_path / "data")
        args = ["--dataset", "wsol", "--metadata-root", str(tmp_path / "meta"), "--data-root", str(tmp_path / "data")]
    out = tmp_path / "out"
    monkeypatch.setenv("SCM_OPS_BACKEND", "torch")
    train_wsol.main(args + ["--mode", "quick", "--image-size", "32", "--pretrained", "none", "--threads", "1",
                            "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == layout and metrics["train_images"] == 3 and metrics["test_images"] == 3
    assert {"baseline", "scm", "untrained", "whole_image_box", "centred_box"} <= set(metrics["results"])
    for name in ("baseline", "scm"):
        assert 0 <= metrics["results"][name]["gt_known_loc"] <= 100
    assert (out / "figure.png").stat().st_size > 0
