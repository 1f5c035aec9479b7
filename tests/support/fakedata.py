"""Tiny data sets written in real on-disk formats (CIFAR python pickles, ImageFolder PNGs)."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING opcodes), as the official CIFAR files hold
    them: torchvision unpickles with ``encoding="latin1"``, which only turns *those* into ``str``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_fake_cifar10(root: Path, per_batch: int = 20, test_size: int = 20, seed: int = 0) -> dict:
    """Write ``root/cifar-10-batches-py`` exactly as the official archive lays it out.

    Images are class-dependent colour blobs plus noise, so a model can learn them. Returns the
    md5 lists that torchvision's integrity check must be pointed at (its own are the real files').
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n: int, name: str) -> dict:
        labels = [int(v) for v in rng.integers(0, 10, n)]
        data = rng.integers(0, 60, (n, 3, 32, 32), dtype=np.uint8)
        for i, label in enumerate(labels):  # a bright square whose place and colour give the class
            r, c = divmod(label, 4)
            data[i, label % 3, 4 + 8 * r : 12 + 8 * r, 4 + 6 * c : 12 + 6 * c] = 250
        # The official layout: (N, 3072) uint8 rows (R plane, G plane, B plane), a list of labels.
        return {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data.reshape(n, -1),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }

    train_list, written = [], {}
    for k in range(1, 6):
        name = f"data_batch_{k}"
        written[name] = batch(per_batch, name)
        (folder / name).write_bytes(_py2_pickle(written[name]))
        train_list.append([name, _md5(folder / name)])
    written["test_batch"] = batch(test_size, "test_batch")
    (folder / "test_batch").write_bytes(_py2_pickle(written["test_batch"]))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta))
    return {
        "train_list": train_list,
        "test_list": [["test_batch", _md5(folder / "test_batch")]],
        "meta": {"filename": "batches.meta", "key": "label_names", "md5": _md5(folder / "batches.meta")},
        "batches": written,
    }


def point_cifar10_at(monkeypatch, md5s: dict) -> None:
    """Make torchvision's CIFAR10 integrity check accept the fake files (nothing else changes)."""
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "train_list", md5s["train_list"])
    monkeypatch.setattr(CIFAR10, "test_list", md5s["test_list"])
    monkeypatch.setattr(CIFAR10, "meta", md5s["meta"])


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("circle", "square"),
    per_class: int = 8,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """PNG images under ``root/<class>/``; each class a differently coloured, placed square."""
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            lo = 2 + (ci * size // (2 * len(classes)))
            img[lo : lo + size // 3, lo : lo + size // 3, ci % 3] = 240
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root
