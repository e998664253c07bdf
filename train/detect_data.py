"""Detection data: cluttered digit scenes, YOLO-format export and a YOLO-format folder dataset.

* :func:`make_digit_scenes`: 2-6 scikit-learn digits (8x8 sources scaled 1-3x, i.e. 8-24 px, bilinearly) at random
  positions on a square canvas (96x96 by default), their boxes overlapping at most ``max_iou``, among clutter
  fragments cut from other digits; pixels combine with ``max``. A digit's pixels are its *ink*: the scaled
  digit's values ``>= INK_THRESHOLD`` (the rest is zeroed before pasting), and its box is the tight box of that
  ink, xyxy in pixels (exclusive right/bottom edge, as YOLO's continuous coordinates: a box ``[x1, x2)`` covers
  pixels ``x1 .. x2 - 1``). Deterministic from the seed; the digits use their own random stream, so
  ``clutter=0`` gives the same digits at the same places without clutter.
* :func:`load_digit_scenes`: the fixed train/validation split; scenes of the two parts are built from
  disjoint sets of source digits.
* :func:`export_yolo` / :func:`load_yolo_folder`: the YOLO layout ``images/<split>/*.png`` and
  ``labels/<split>/*.txt`` (one ``class cx cy w h`` line per object, normalised to [0, 1]) plus a
  ``data.yaml`` that the PyTorch YOLOv5 trainer reads (``python train.py --data <root>/data.yaml``) and a
  ``classes.txt``. The loader letterboxes every image to the training size (YOLOv5's geometry) and reports a
  bad label line by file and line (:class:`train.data.DataError`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from train.data import IMAGE_EXTENSIONS, DataError, _sklearn_digits, _split

#: a scaled digit's pixel belongs to its ink (and is pasted) when its value is at least this
INK_THRESHOLD = 0.25
#: YOLOv5's letterbox fill (114 / 255)
PAD_VALUE = 114.0 / 255.0


@dataclass(frozen=True)
class DetectionDataset:
    """Images ``(N, S, S, C)`` float32 in [0, 1] and up to ``M`` objects per image, padded:
    ``boxes (N, M, 4)`` float32 xyxy in pixels of the image, ``classes (N, M)`` int32, ``valid (N, M)`` bool
    (padding rows are zero and ``False``). ``files`` names the source of each image (export/import);
    ``skipped`` lists unreadable images."""

    images: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    valid: np.ndarray
    class_names: tuple[str, ...]
    files: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def max_boxes(self) -> int:
        return int(self.boxes.shape[1])

    def take(self, idx: np.ndarray) -> DetectionDataset:
        files = tuple(self.files[int(i)] for i in idx) if self.files else ()
        return dataclasses.replace(self, images=self.images[idx], boxes=self.boxes[idx], classes=self.classes[idx],
                                   valid=self.valid[idx], files=files)

    def pad_to(self, max_boxes: int) -> DetectionDataset:
        """The same data with ``max_boxes`` object slots (more padding); refuses to drop objects."""
        m = self.max_boxes
        if max_boxes < m:
            most = int(self.valid.sum(1).max()) if len(self) else 0
            if max_boxes < most:
                raise DataError(f"max_boxes {max_boxes} is smaller than the most objects in one image ({most})")
            order = np.argsort(~self.valid, axis=1, kind="stable")[:, :max_boxes]
            return dataclasses.replace(self, boxes=np.take_along_axis(self.boxes, order[..., None], 1),
                                       classes=np.take_along_axis(self.classes, order, 1),
                                       valid=np.take_along_axis(self.valid, order, 1))
        extra = max_boxes - m
        return dataclasses.replace(
            self, boxes=np.pad(self.boxes, ((0, 0), (0, extra), (0, 0))),
            classes=np.pad(self.classes, ((0, 0), (0, extra))), valid=np.pad(self.valid, ((0, 0), (0, extra))))


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` bilinear weights, half-pixel centres and edge clamp (cv2 ``INTER_LINEAR`` geometry)."""
    x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - (x - lo))
    np.add.at(m, (np.arange(n_out), hi), x - lo)
    return m


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box ``a (4,)`` with boxes ``b (K, 4)``."""
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def make_digit_scenes(digits: np.ndarray, labels: np.ndarray, num: int, *, canvas: int = 96,
                      num_digits: tuple[int, int] = (2, 6), scale: tuple[float, float] = (1.0, 3.0),
                      max_iou: float = 0.1, clutter: int = 6, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``num`` scenes of digits from ``digits (n, h, w)`` in [0, 1] with their classes ``labels (n,)``.

    Each scene holds ``k ~ U{num_digits}`` digits, each scaled by ``U(scale)`` (side ``round(h * s)``) and
    placed uniformly at random where its square overlaps every earlier digit's square by IoU <= ``max_iou``
    (up to 100 tries; a digit that finds no place is left out, so crowded canvases can hold fewer); then
    ``clutter`` fragments (random crops, a third of a digit's side, of random source digits) anywhere.

    Returns ``images (num, canvas, canvas)`` float32, ``boxes (num, M, 4)`` float32 xyxy pixels (the tight
    box of each digit's ink, exclusive end), ``classes (num, M)`` int32 and ``valid (num, M)`` bool, with
    ``M = num_digits[1]``.

    Example:
        >>> import numpy as np
        >>> d = np.zeros((3, 8, 8), np.float32); d[:, 2:6, 3:5] = 1.0
        >>> im, bx, cl, va = make_digit_scenes(d, np.array([0, 1, 2]), 2, canvas=64, clutter=0, seed=1)
        >>> im.shape, bx.shape, bool(va[:, :2].all())
        ((2, 64, 64), (2, 6, 4), True)
    """
    digits = np.asarray(digits, np.float32)
    if digits.ndim != 3:
        raise ValueError(f"digits: expected source images (n, h, w), got shape {digits.shape}")
    lo_k, hi_k = num_digits
    if not 1 <= lo_k <= hi_k:
        raise ValueError(f"num_digits: expected (lo, hi) with 1 <= lo <= hi, got {num_digits}")
    lo_s, hi_s = scale
    if not 0 < lo_s <= hi_s:
        raise ValueError(f"scale: expected (lo, hi) with 0 < lo <= hi, got {scale}")
    side_max = int(round(digits.shape[1] * hi_s))
    if canvas < side_max + 1:
        raise ValueError(f"canvas {canvas} is too small for digits of {side_max} px (scale {scale})")
    n = digits.shape[0]
    rng_digit = np.random.default_rng([seed, 11])
    rng_clutter = np.random.default_rng([seed, 12])
    mats: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def scaled(i: int, side: int) -> np.ndarray:
        """Source digit ``i`` resized bilinearly to ``(side, side)``, zero below the ink threshold."""
        h, w = digits.shape[1:]
        if (h, side) not in mats:
            mats[(h, side)] = (_interp_matrix(h, side), _interp_matrix(w, side))
        rh, rw = mats[(h, side)]
        d = np.clip(rh @ digits[i].astype(np.float64) @ rw.T, 0.0, 1.0)
        return np.where(d >= INK_THRESHOLD, d, 0.0).astype(np.float32)

    images = np.zeros((num, canvas, canvas), np.float32)
    boxes = np.zeros((num, hi_k, 4), np.float32)
    classes = np.zeros((num, hi_k), np.int32)
    valid = np.zeros((num, hi_k), bool)
    for k in range(num):
        img = images[k]
        count = int(rng_digit.integers(lo_k, hi_k + 1))
        squares: list[np.ndarray] = []
        placed = []
        for _ in range(count):
            i = int(rng_digit.integers(n))
            side = int(round(digits.shape[1] * rng_digit.uniform(lo_s, hi_s)))
            d = scaled(i, side)
            if not d.any():
                continue
            for _try in range(100):
                top, left = (int(v) for v in rng_digit.integers(0, canvas - side + 1, size=2))
                sq = np.array([left, top, left + side, top + side], np.float64)
                if not squares or _iou(sq, np.stack(squares)).max() <= max_iou:
                    squares.append(sq)
                    placed.append((i, d, top, left))
                    break
        # clutter first, digits on top (max combination: the order changes nothing but reads naturally)
        for _ in range(clutter):
            j = int(rng_clutter.integers(n))
            sj = scaled(j, int(round(digits.shape[1] * rng_clutter.uniform(lo_s, hi_s))))
            frag = max(2, sj.shape[0] // 3)
            cy, cx = (int(v) for v in rng_clutter.integers(0, sj.shape[0] - frag + 1, size=2))
            py, px = (int(v) for v in rng_clutter.integers(0, canvas - frag + 1, size=2))
            np.maximum(img[py:py + frag, px:px + frag], sj[cy:cy + frag, cx:cx + frag],
                       out=img[py:py + frag, px:px + frag])
        for slot, (i, d, top, left) in enumerate(placed):
            s = d.shape[0]
            np.maximum(img[top:top + s, left:left + s], d, out=img[top:top + s, left:left + s])
            rows, cols = np.nonzero(d.any(axis=1))[0], np.nonzero(d.any(axis=0))[0]
            boxes[k, slot] = (left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1)
            classes[k, slot] = labels[i]
            valid[k, slot] = True
    return images, boxes, classes, valid


@dataclass(frozen=True)
class SceneSpec:
    """The parameters of :func:`load_digit_scenes` (the data fields of :class:`train.detect.DetectConfig`)."""

    num_train: int = 2000
    num_val: int = 200
    canvas: int = 96
    num_digits: tuple[int, int] = (2, 6)
    scale: tuple[float, float] = (1.0, 3.0)
    max_iou: float = 0.1
    clutter: int = 6
    val_fraction: float = 0.2
    seed: int = 0


def load_digit_scenes(spec: SceneSpec = SceneSpec()) -> tuple[DetectionDataset, DetectionDataset]:
    """The fixed (train, validation) scenes of ``spec``: the scikit-learn digits are split once by
    ``spec.seed`` (``val_fraction`` of them held out) and each part's scenes use only its own source digits.

    Example:
        >>> tr, va = load_digit_scenes(SceneSpec(num_train=4, num_val=2, canvas=64))
        >>> tr.images.shape, va.boxes.shape, tr.class_names[:3]
        ((4, 64, 64, 1), (2, 6, 4), ('0', '1', '2'))
    """
    digits, labels = _sklearn_digits()
    tr, va = _split(len(labels), spec.val_fraction, spec.seed)
    names = tuple(str(i) for i in range(10))
    out = []
    for part, idx, num in ((1, tr, spec.num_train), (2, va, spec.num_val)):
        im, bx, cl, ok = make_digit_scenes(digits[idx], labels[idx], num, canvas=spec.canvas,
                                           num_digits=spec.num_digits, scale=spec.scale, max_iou=spec.max_iou,
                                           clutter=spec.clutter, seed=spec.seed * 1000 + part)
        split = "train" if part == 1 else "val"
        out.append(DetectionDataset(im[..., None], bx, cl, ok, names,
                                    files=tuple(f"{split}/{j:06d}.png" for j in range(num))))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------
# YOLO format
# --------------------------------------------------------------------------------------------------

def yolo_label_lines(boxes: np.ndarray, classes: np.ndarray, valid: np.ndarray, size: tuple[int, int]) -> list[str]:
    """``class cx cy w h`` lines (normalised by ``size = (height, width)``) of the valid objects of one image."""
    h, w = size
    lines = []
    for (x1, y1, x2, y2), c in zip(np.asarray(boxes, np.float64)[valid], np.asarray(classes)[valid]):
        lines.append(f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                     f"{(y2 - y1) / h:.6f}")
    return lines


def export_yolo(root: str, splits: dict[str, DetectionDataset]) -> str:
    """Writes ``splits`` (e.g. ``{"train": tr, "val": va}``) in the YOLO layout under ``root``:
    ``images/<split>/<i>.png`` (8-bit PNG, grey or RGB), ``labels/<split>/<i>.txt``, ``classes.txt`` and a
    ``data.yaml`` for the PyTorch YOLOv5 trainer. Returns the path of ``data.yaml``.

    Example:
        >>> import tempfile
        >>> tr, va = load_digit_scenes(SceneSpec(num_train=2, num_val=1, canvas=64))
        >>> os.path.basename(export_yolo(tempfile.mkdtemp(), {"train": tr, "val": va}))
        'data.yaml'
    """
    from PIL import Image

    if not splits:
        raise ValueError("export_yolo: expected at least one split, got none")
    names = next(iter(splits.values())).class_names
    for split, ds in splits.items():
        if ds.class_names != names:
            raise ValueError(f"export_yolo: split {split!r} has classes {ds.class_names}, expected {names}")
        img_dir, lbl_dir = os.path.join(root, "images", split), os.path.join(root, "labels", split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(lbl_dir, exist_ok=True)
        for j in range(len(ds)):
            im = np.round(np.clip(ds.images[j], 0.0, 1.0) * 255.0).astype(np.uint8)
            Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(os.path.join(img_dir, f"{j:06d}.png"))
            lines = yolo_label_lines(ds.boxes[j], ds.classes[j], ds.valid[j], ds.images.shape[1:3])
            with open(os.path.join(lbl_dir, f"{j:06d}.txt"), "w") as f:
                f.write("".join(line + "\n" for line in lines))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    path = os.path.join(root, "data.yaml")
    with open(path, "w") as f:
        f.write(f"path: {os.path.abspath(root)}\n")
        for split in splits:
            f.write(f"{split}: images/{split}\n")
        f.write(f"nc: {len(names)}\n")
        f.write("names: [" + ", ".join(repr(n) for n in names) + "]\n")
    return path


def read_yolo_labels(path: str, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(classes (K,) int32, cxcywh (K, 4) float64)`` of one YOLO label file (blank lines ignored).

    Raises:
        DataError: naming the file and the 1-based line: not 5 fields, a non-integer or negative class (or one
            ``>= num_classes``), a non-number or non-finite coordinate, a centre outside [0, 1], or a width or
            height outside (0, 1].
    """
    classes, rows = [], []
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            parts = line.split()
            if len(parts) != 5:
                raise DataError(f"{where}: expected 5 fields 'class cx cy w h', got {len(parts)}: {line!r}")
            try:
                c = int(parts[0])
            except ValueError:
                raise DataError(f"{where}: class must be an integer, got {parts[0]!r}") from None
            if c < 0 or (num_classes is not None and c >= num_classes):
                expected = f"in [0, {num_classes - 1}]" if num_classes is not None else ">= 0"
                raise DataError(f"{where}: class {c} out of range: expected {expected}")
            try:
                v = [float(p) for p in parts[1:]]
            except ValueError:
                raise DataError(f"{where}: cx cy w h must be numbers, got {parts[1:]}") from None
            if not all(np.isfinite(v)):
                raise DataError(f"{where}: cx cy w h must be finite, got {parts[1:]}")
            if not (0.0 <= v[0] <= 1.0 and 0.0 <= v[1] <= 1.0):
                raise DataError(f"{where}: box centre ({v[0]}, {v[1]}) outside [0, 1]: expected coordinates "
                                f"normalised by the image size")
            if not (0.0 < v[2] <= 1.0 and 0.0 < v[3] <= 1.0):
                raise DataError(f"{where}: box size ({v[2]}, {v[3]}) outside (0, 1]: expected a positive width "
                                f"and height normalised by the image size")
            classes.append(c)
            rows.append(v)
    return np.asarray(classes, np.int32), np.asarray(rows, np.float64).reshape(-1, 4)


def _class_names(root: str) -> tuple[str, ...] | None:
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not names:
        raise DataError(f"{path} lists no class name (expected one per line)")
    return names


def letterbox_np(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """YOLOv5's letterbox (``auto=False``) of one ``(h, w, C)`` float image to ``(size, size, C)`` on the host:
    bilinear resize by ``r = size / max(h, w)``, centred padding with 114/255. Returns the image, ``r`` and the
    ``(left, top)`` padding (box pixels map as ``x * r + left``)."""
    from PIL import Image

    from flax_attn.models.yolo_ops import letterbox_params

    h, w, c = image.shape
    p = letterbox_params((h, w), size, auto=False)
    nh, nw = p.new_unpad
    chans = []
    for k in range(c):
        ch = image[..., k].astype(np.float32)
        if (nh, nw) != (h, w):
            ch = np.asarray(Image.fromarray(ch, mode="F").resize((nw, nh), Image.Resampling.BILINEAR))
        chans.append(ch)
    resized = np.clip(np.stack(chans, -1), 0.0, 1.0)
    out = np.pad(resized, ((p.top, p.bottom), (p.left, p.right), (0, 0)), constant_values=PAD_VALUE)
    return out.astype(np.float32), float(p.ratio[0]), (float(p.left), float(p.top))


def _decode_image(path: str, mode: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return _decode_keep_size(im, mode)


def _decode_keep_size(im, mode: str) -> np.ndarray:
    """One PIL image as float32 ``(h, w, C)`` in [0, 1] at its own size (8 or 16 bits, as the classifier folder)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)[..., None]
        return grey if mode == "L" else np.repeat(grey, 3, axis=-1)
    if im.mode == "F":
        raise ValueError("floating-point images are not supported (no known bit depth): save them as 8 or 16 bit")
    arr = np.asarray(im.convert(mode), np.float32) / 255.0
    return arr if arr.ndim == 3 else arr[..., None]


def _yolo_split(root: str, split: str | None, size: int, mode: str, names: tuple[str, ...] | None,
                max_boxes: int) -> DetectionDataset:
    img_dir = os.path.join(root, "images", split) if split else os.path.join(root, "images")
    lbl_dir = os.path.join(root, "labels", split) if split else os.path.join(root, "labels")
    files = [n for n in sorted(os.listdir(img_dir))
             if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(img_dir, n))]
    nc = None if names is None else len(names)
    images, objects, kept, skipped = [], [], [], []
    for name in files:
        path = os.path.join(img_dir, name)
        try:
            img = _decode_image(path, mode)
        except (OSError, ValueError, SyntaxError) as e:
            skipped.append(f"{path}: {type(e).__name__}: {e}")
            continue
        lbl = os.path.join(lbl_dir, os.path.splitext(name)[0] + ".txt")
        cls, xywh = read_yolo_labels(lbl, nc) if os.path.isfile(lbl) else (np.zeros(0, np.int32), np.zeros((0, 4)))
        h, w = img.shape[:2]
        lb, r, (left, top) = letterbox_np(img, size)
        xyxy = np.stack([(xywh[:, 0] - xywh[:, 2] / 2) * w, (xywh[:, 1] - xywh[:, 3] / 2) * h,
                         (xywh[:, 0] + xywh[:, 2] / 2) * w, (xywh[:, 1] + xywh[:, 3] / 2) * h], -1)
        xyxy = np.clip(xyxy, 0, [w, h, w, h]) * r + np.array([left, top, left, top])
        images.append(lb)
        objects.append((cls, xyxy))
        kept.append(os.path.relpath(path, root))
    if not images:
        raise DataError(f"{img_dir}: no readable image ({len(files)} image files, {len(skipped)} unreadable)")
    most = max(len(c) for c, _ in objects)
    m = max(most, max_boxes, 1)
    if max_boxes and most > max_boxes:
        worst = kept[int(np.argmax([len(c) for c, _ in objects]))]
        raise DataError(f"{worst} has {most} objects, more than max_boxes {max_boxes}")
    n = len(images)
    boxes, classes, valid = np.zeros((n, m, 4), np.float32), np.zeros((n, m), np.int32), np.zeros((n, m), bool)
    for j, (c, b) in enumerate(objects):
        boxes[j, :len(c)], classes[j, :len(c)], valid[j, :len(c)] = b, c, True
    if names is None:
        top_class = int(classes[valid].max()) if valid.any() else 0
        names = tuple(str(i) for i in range(top_class + 1))
    return DetectionDataset(np.stack(images), boxes, classes, valid, names, files=tuple(kept),
                            skipped=tuple(skipped))


def load_yolo_folder(root: str, *, image_size: int, in_chans: int = 3, val_fraction: float = 0.2, seed: int = 0,
                     max_boxes: int = 0, splits: Sequence[str] = ("train", "val")
                     ) -> tuple[DetectionDataset, DetectionDataset]:
    """(train, validation) of a YOLO-format folder: ``root/images/{train,val}/`` with ``root/labels/{train,val}/``
    (or flat ``root/images/`` + ``root/labels/``, split by ``val_fraction`` with ``seed``). An image without a
    label file has no objects (as in YOLOv5). Class names come from ``root/classes.txt`` (one per line; classes
    beyond it are an error) or are ``0 .. max class``. Every image is letterboxed to ``image_size`` square;
    ``max_boxes`` (0 = the most in any image) is the padded number of object slots.

    Raises:
        FileNotFoundError: ``root/images`` is missing.
        DataError: a bad label line (file and line named), no readable image, more than ``max_boxes`` objects.
    """
    img_root = os.path.join(root, "images")
    if not os.path.isdir(img_root):
        raise FileNotFoundError(f"YOLO folder {root!r}: expected {img_root} (with {os.path.join(root, 'labels')} "
                                f"next to it)")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    mode = "L" if in_chans == 1 else "RGB"
    names = _class_names(root)
    if all(os.path.isdir(os.path.join(img_root, s)) for s in splits[:2]):
        tr = _yolo_split(root, splits[0], image_size, mode, names, max_boxes)
        va = _yolo_split(root, splits[1], image_size, mode, names, max_boxes)
        if names is None:  # the larger of the two inferred class lists
            names = max(tr.class_names, va.class_names, key=len)
            tr, va = dataclasses.replace(tr, class_names=names), dataclasses.replace(va, class_names=names)
        m = max(tr.max_boxes, va.max_boxes)
        return tr.pad_to(m), va.pad_to(m)
    ds = _yolo_split(root, None, image_size, mode, names, max_boxes)
    if len(ds) < 2:
        raise DataError(f"YOLO folder {root!r}: {len(ds)} readable image, need at least 2 to split")
    tr_idx, va_idx = _split(len(ds), val_fraction, seed)
    return ds.take(tr_idx), ds.take(va_idx)


__all__ = [
    "INK_THRESHOLD",
    "DetectionDataset",
    "SceneSpec",
    "export_yolo",
    "letterbox_np",
    "load_digit_scenes",
    "load_yolo_folder",
    "make_digit_scenes",
    "read_yolo_labels",
    "yolo_label_lines",
]
