"""Datasets of the training application: determinism, the fixed split, cluttered-digit boxes, image folders."""

import logging

import numpy as np
import pytest
from PIL import Image

from train.config import Config
from train.data import DataError, batch_indices, check_folder, load_dataset, make_cluttered_digits


def _digits(n=30, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.2, 1.0, size=(n, 8, 8)).astype(np.float32)
    d[:, :, :2] = 0.0  # empty margins, so the tight box is smaller than the scaled patch
    return d, (np.arange(n) % 10).astype(np.int32)


def test_digits_split_is_fixed_and_disjoint():
    tr, va = load_dataset(Config())
    tr2, va2 = load_dataset(Config(seed=7))  # the training seed does not move the split
    assert len(tr) + len(va) == 1797 and len(va) == round(1797 * 0.2)
    np.testing.assert_array_equal(tr.images, tr2.images)
    np.testing.assert_array_equal(va.labels, va2.labels)
    assert tr.images.shape[1:] == (8, 8, 1) and 0.0 <= tr.images.min() and tr.images.max() <= 1.0
    # no validation image is also a training image
    tr_keys = {im.tobytes() for im in tr.images}
    dup = sum(im.tobytes() in tr_keys for im in va.images)
    assert dup <= 2, dup  # sklearn's digits contain a couple of exact duplicates, nothing more
    tr3, _ = load_dataset(Config(data_seed=1))
    assert not np.array_equal(tr.labels, tr3.labels)


def test_cluttered_generator_is_deterministic():
    d, lb = _digits()
    a = make_cluttered_digits(d, lb, 12, canvas=32, clutter=5, seed=3)
    b = make_cluttered_digits(d, lb, 12, canvas=32, clutter=5, seed=3)
    c = make_cluttered_digits(d, lb, 12, canvas=32, clutter=5, seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (12, 32, 32) and a[0].dtype == np.float32


def test_cluttered_boxes_contain_the_digit():
    d, lb = _digits()
    clean, lab0, box0 = make_cluttered_digits(d, lb, 40, canvas=40, clutter=0, seed=1)
    full, lab1, box1 = make_cluttered_digits(d, lb, 40, canvas=40, clutter=8, seed=1)
    np.testing.assert_array_equal(lab0, lab1)
    np.testing.assert_array_equal(box0, box1)  # the digit's placement does not depend on the clutter
    for img, (t, l, b, r) in zip(clean, box0):
        assert 0 <= t < b <= 40 and 0 <= l < r <= 40
        ink = np.argwhere(img > 0)
        assert ink.size > 0
        # every digit pixel lies inside the box, and the box is tight (ink on each of its four edges)
        assert ink[:, 0].min() == t and ink[:, 0].max() == b - 1
        assert ink[:, 1].min() == l and ink[:, 1].max() == r - 1
    assert np.all(full >= clean)  # clutter is composited with max: it never erases the digit
    outside = full.copy()
    for img, (t, l, b, r) in zip(outside, box0):
        img[t:b, l:r] = 0
    assert outside.sum() > 0  # there is clutter outside the boxes
    sides = box0[:, 2:] - box0[:, :2]
    assert sides.max() <= round(0.42 * 40) and sides.min() >= 4


def test_cluttered_dataset_has_boxes_and_labels():
    cfg = Config(dataset="cluttered_digits", image_size=32, cluttered_train=50, cluttered_val=20, clutter=3)
    tr, va = load_dataset(cfg)
    assert tr.images.shape == (50, 32, 32, 1) and va.boxes.shape == (20, 4)
    assert set(np.unique(tr.labels)) <= set(range(10))
    tr2, _ = load_dataset(cfg)
    np.testing.assert_array_equal(tr.images, tr2.images)


def test_batch_order_is_a_function_of_seed_and_step():
    n, bs = 50, 8
    spe = n // bs
    epoch0 = np.concatenate([batch_indices(n, bs, 0, s) for s in range(spe)])
    assert len(set(epoch0.tolist())) == spe * bs  # no repeats within an epoch
    np.testing.assert_array_equal(batch_indices(n, bs, 0, 3), batch_indices(n, bs, 0, 3))
    assert not np.array_equal(batch_indices(n, bs, 0, 0), batch_indices(n, bs, 0, spe))  # reshuffled
    assert not np.array_equal(batch_indices(n, bs, 0, 0), batch_indices(n, bs, 1, 0))
    with pytest.raises(ValueError, match="larger than the training set"):
        batch_indices(5, 8, 0, 0)


def _write_folder(root, n_per_class=6, size=(10, 12)):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    (root / "cat" / "notes.txt").write_text("ignored: not an image")


def test_image_folder_reports_corrupt_files(tmp_path):
    _write_folder(tmp_path)
    tr, va = load_dataset(Config(dataset="folder", data_dir=str(tmp_path), image_size=16))
    assert len(tr) + len(va) == 12
    assert tr.class_names == ("cat", "dog")
    assert tr.images.shape[1:] == (16, 16, 3)
    assert len(tr.skipped) == 1 and "broken.png" in tr.skipped[0]
    tr1, _ = load_dataset(Config(dataset="folder", data_dir=str(tmp_path), image_size=8, in_chans=1))
    assert tr1.images.shape[1:] == (8, 8, 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(Config(dataset="folder", data_dir=str(tmp_path / "missing")))
    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="at least 2"):
        load_dataset(Config(dataset="folder", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="needs data_dir"):
        Config(dataset="folder")


def test_empty_class_folder_is_refused_or_dropped(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "zebra").mkdir()  # no image at all: would be a class no example teaches
    (tmp_path / "yak").mkdir()
    (tmp_path / "yak" / "only.png").write_bytes(b"broken")  # image files, none readable
    cfg = Config(dataset="folder", data_dir=str(tmp_path), image_size=8)
    with pytest.raises(DataError, match=r"class folder\(s\) \['zebra'\] hold no image files.*--drop_empty_classes"):
        load_dataset(cfg)
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="zebra"):
        check_folder(str(tmp_path))
    (tmp_path / "zebra" / "notes.txt").unlink()
    (tmp_path / "zebra").rmdir()
    with pytest.raises(DataError, match=r"\['yak'\] hold no readable image"):
        load_dataset(cfg)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # on the logger itself: the CLI may have turned its propagation off
    logging.getLogger("train").addHandler(handler)
    try:
        (tmp_path / "zebra").mkdir()
        tr, va = load_dataset(cfg.replace(drop_empty_classes=True))
    finally:
        logging.getLogger("train").removeHandler(handler)
    assert tr.class_names == ("cat", "dog") and set(tr.labels) | set(va.labels) == {0, 1}
    assert any("dropped class folder(s) without a readable image: ['yak', 'zebra']" in r.getMessage()
               for r in records)


def test_two_class_folders_one_empty_is_not_a_one_class_problem(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(4):
        Image.fromarray(np.full((6, 6), 10 * i, np.uint8)).save(tmp_path / "a" / f"{i}.png")
    for drop in (False, True):
        with pytest.raises(DataError, match="need at least 2|hold no image files"):
            load_dataset(Config(dataset="folder", data_dir=str(tmp_path), image_size=8, drop_empty_classes=drop))


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            arr = rng.integers(0, 65536, size=(12, 12), dtype=np.uint16)  # mean 0.5 of full scale
            Image.fromarray(arr).save(tmp_path / c / f"{i}.png")
    with Image.open(tmp_path / "a" / "0.png") as im:
        assert im.mode == "I;16"  # a real 16-bit PNG
    expected = np.stack([np.asarray(Image.open(tmp_path / c / f"{i}.png"), np.float64) / 65535
                         for c in ("a", "b") for i in range(2)])
    for chans in (1, 3):
        tr, va = load_dataset(Config(dataset="folder", data_dir=str(tmp_path), image_size=12, in_chans=chans,
                                     val_fraction=0.25))
        images = np.concatenate([tr.images, va.images])
        assert images.shape[1:] == (12, 12, chans)
        np.testing.assert_allclose(np.sort(images[..., 0].mean(axis=(1, 2))),
                                   np.sort(expected.mean(axis=(1, 2))), atol=1e-6)
        assert 0.4 < images.mean() < 0.6 and images.max() <= 1.0


def test_config_rejects_bad_numbers_and_types():
    for kwargs, message in ((dict(learning_rate=float("nan")), "learning_rate must be a finite number >= 0"),
                            (dict(learning_rate=-1.0), "learning_rate must be a finite number >= 0"),
                            (dict(grad_clip_norm=float("inf")), "grad_clip_norm must be a finite"),
                            (dict(momentum=1.0), "momentum must be in"),
                            (dict(label_smoothing=float("nan")), "label_smoothing must be in"),
                            (dict(step_milestones=(0.5, float("nan"))), "step_milestones must be fractions"),
                            (dict(step_factor=float("nan")), "step_factor must be a finite number > 0")):
        with pytest.raises(ValueError, match=message):
            Config(**kwargs)
    with pytest.raises(TypeError, match="width must be int, got '16'"):
        Config(width="16")
    with pytest.raises(TypeError, match="progress must be bool"):
        Config(progress=1)
