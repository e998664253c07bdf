"""Detection training: digit scenes, the YOLO format (export, import, bad labels), the training loop (loss
falls, mAP above a floor, exact resume).

The scenes are small (64x64 canvases, a few dozen images) and one tiny YOLOv5 (width 1/16) run is shared by
the loop tests, so the file stays within about a minute and a half of CPU time.
"""

import numpy as np
import pytest

from train.data import DataError
from train.detect_data import (
    INK_THRESHOLD,
    SceneSpec,
    export_yolo,
    load_digit_scenes,
    load_yolo_folder,
    make_digit_scenes,
    read_yolo_labels,
)

SPEC = SceneSpec(num_train=24, num_val=8, canvas=64, clutter=4, seed=3)


@pytest.fixture(scope="module")
def scenes():
    return load_digit_scenes(SPEC)


def test_scenes_deterministic_and_seeded(scenes):
    tr, va = scenes
    tr2, va2 = load_digit_scenes(SPEC)
    for a, b in ((tr, tr2), (va, va2)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_array_equal(a.valid, b.valid)
    other, _ = load_digit_scenes(SceneSpec(num_train=24, num_val=8, canvas=64, clutter=4, seed=4))
    assert not np.array_equal(other.images, tr.images)
    counts = tr.valid.sum(1)
    assert counts.min() >= 2 and counts.max() <= 6 and tr.images.shape == (24, 64, 64, 1)
    assert set(np.unique(tr.classes[tr.valid])) <= set(range(10))
    assert tr.images.min() >= 0.0 and tr.images.max() <= 1.0


def test_scene_boxes_tight_around_each_digits_ink():
    """Without clutter every ink pixel lies in some box, and each box's four edge rows/columns hold ink
    (so no box can shrink); with clutter the digits are the same (their own random stream)."""
    from train.data import _sklearn_digits

    digits, labels = _sklearn_digits()
    im0, bx0, cl0, ok0 = make_digit_scenes(digits[:300], labels[:300], 20, canvas=80, clutter=0, seed=5)
    im1, bx1, cl1, _ = make_digit_scenes(digits[:300], labels[:300], 20, canvas=80, clutter=10, seed=5)
    np.testing.assert_array_equal(bx0, bx1)
    np.testing.assert_array_equal(cl0, cl1)
    assert (im1 >= im0).all() and (im1 > im0).any()  # clutter adds ink, never removes a digit's
    ys, xs = np.mgrid[:80, :80]
    for img, boxes, valid in zip(im0, bx0, ok0):
        ink = img >= INK_THRESHOLD
        covered = np.zeros_like(ink)
        for x1, y1, x2, y2 in boxes[valid].astype(int):
            covered |= (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
            assert ink[y1, x1:x2].any() and ink[y2 - 1, x1:x2].any(), (x1, y1, x2, y2)
            assert ink[y1:y2, x1].any() and ink[y1:y2, x2 - 1].any(), (x1, y1, x2, y2)
            assert 1 <= x2 - x1 <= 24 and 1 <= y2 - y1 <= 24
        assert not (ink & ~covered).any()
        assert not (img[(img > 0)] < INK_THRESHOLD).any()  # nothing below the ink threshold is pasted


def test_scene_overlap_limited():
    from train.data import _sklearn_digits
    from train.detect_data import _iou

    digits, labels = _sklearn_digits()
    _, boxes, _, valid = make_digit_scenes(digits, labels, 30, canvas=64, num_digits=(6, 6), max_iou=0.1, seed=2)
    for b, v in zip(boxes, valid):
        b = b[v].astype(np.float64)
        for i in range(len(b)):
            # ink boxes lie inside their placement squares (pairwise IoU <= 0.1), so they overlap little too
            # (not bounded by 0.1 themselves: a thin "1" can sit in a small overlap; 0.5 holds on these seeds)
            if len(b) > 1:
                assert (_iou(b[i], np.delete(b, i, 0)) <= 0.5).all()


def test_yolo_export_import_round_trip(scenes, tmp_path):
    tr, va = scenes
    yaml_path = export_yolo(str(tmp_path), {"train": tr, "val": va})
    with open(yaml_path) as f:
        text = f.read()
    assert "train: images/train" in text and "val: images/val" in text and "nc: 10" in text
    tr2, va2 = load_yolo_folder(str(tmp_path), image_size=64, in_chans=1)
    for a, b in ((tr, tr2), (va, va2)):
        assert b.class_names == a.class_names and len(b) == len(a)
        np.testing.assert_allclose(b.images, np.round(a.images * 255) / 255, atol=1e-6)
        m = a.max_boxes
        np.testing.assert_array_equal(b.valid[:, :m], a.valid[:, :b.max_boxes] if b.max_boxes < m else a.valid)
        np.testing.assert_array_equal(b.classes[b.valid], a.classes[a.valid])
        np.testing.assert_allclose(b.boxes[b.valid], a.boxes[a.valid], atol=64 * 1e-6)
    # a label line as written: class and four normalised numbers
    first = (tmp_path / "labels" / "train" / "000000.txt").read_text().splitlines()[0].split()
    assert len(first) == 5 and first[0].isdigit() and all(0 < float(v) <= 1 for v in first[1:])


def test_yolo_folder_letterboxes_other_sizes(tmp_path):
    """A 40x80 RGB image letterboxed to 64: scale 0.8, 16 px of padding above and below, boxes follow."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{k}.png")
        (tmp_path / "labels" / f"{k}.txt").write_text("1 0.5 0.5 0.25 0.5\n\n")
    tr, va = load_yolo_folder(str(tmp_path), image_size=64, in_chans=3, val_fraction=0.34)
    assert len(tr) == 2 and len(va) == 1 and tr.images.shape == (2, 64, 64, 3)
    assert tr.class_names == ("0", "1")
    # x: 30..50 px of 80 -> 24..40; y: 10..30 px of 40 -> 8..24 + 16 padding
    np.testing.assert_allclose(tr.boxes[0, 0], [24, 24, 40, 40], atol=1e-4)
    np.testing.assert_allclose(tr.images[0, :16], 114 / 255, atol=1e-6)


@pytest.mark.parametrize("line, message", [
    ("3 0.5 0.5 0.2", "expected 5 fields"),
    ("x 0.5 0.5 0.2 0.2", "class must be an integer"),
    ("-1 0.5 0.5 0.2 0.2", "class -1 out of range"),
    ("12 0.5 0.5 0.2 0.2", "class 12 out of range: expected in [0, 9]"),
    ("3 0.5 abc 0.2 0.2", "must be numbers"),
    ("3 0.5 nan 0.2 0.2", "must be finite"),
    ("3 1.5 0.5 0.2 0.2", "outside [0, 1]"),
    ("3 0.5 0.5 0 0.2", "outside (0, 1]"),
    ("3 50 60 20 30", "outside [0, 1]"),  # pixel coordinates instead of normalised ones
])
def test_bad_label_lines_name_file_and_line(scenes, tmp_path, line, message):
    tr, va = scenes
    export_yolo(str(tmp_path), {"train": tr, "val": va})
    bad = tmp_path / "labels" / "val" / "000002.txt"
    lines = bad.read_text().splitlines()
    lines.insert(1, line)
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_yolo_folder(str(tmp_path), image_size=64, in_chans=1)
    assert f"{bad}:2:" in str(e.value) and message in str(e.value)
    with pytest.raises(DataError, match=f"{bad}:2:"):
        read_yolo_labels(str(bad), 10)


def test_yolo_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected .*images"):
        load_yolo_folder(str(tmp_path), image_size=64)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no readable image"):
        load_yolo_folder(str(tmp_path), image_size=64)
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"no readable image .*1 unreadable"):
        load_yolo_folder(str(tmp_path), image_size=64)
