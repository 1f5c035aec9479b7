"""Data sets, splits and transforms (densenet_efficient.training.data)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from densenet_efficient.training.data import (
    CIFAR_STATS,
    DIGITS_TEST_SIZE,
    build_data,
    detect_dataset,
    imagenet_transforms,
    split_indices,
)

from ..support.fakedata import point_cifar10_at, write_fake_cifar10, write_image_folder


def _ids(subset) -> set[int]:
    return set(subset.indices)


def test_digits_is_real_scikit_learn_data_upsampled_to_32x32():
    from sklearn.datasets import load_digits

    bundle = build_data("digits", valid_size=200, seed=3)
    assert bundle.name == "digits" and bundle.num_classes == 10 and bundle.small_inputs
    assert len(bundle.train) + len(bundle.valid) + len(bundle.test) == 1797
    assert len(bundle.test) == DIGITS_TEST_SIZE and len(bundle.valid) == 200
    train, valid, test = _ids(bundle.train), _ids(bundle.valid), _ids(bundle.test)
    assert not (train & valid) and not (train & test) and not (valid & test)

    image, label = bundle.valid[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey repeated
    source = load_digits()
    index = bundle.valid.indices[0]
    assert label == int(source.target[index])
    # Upsampling kept the picture: 4x4 average pooling is strongly correlated with the 8x8 digit.
    raw = bundle.valid.dataset.images[index].float()[0] / 255
    pooled = torch.nn.functional.avg_pool2d(raw[None, None], 4)[0, 0].flatten()
    original = torch.tensor(source.images[index] / 16, dtype=torch.float32).flatten()
    assert torch.corrcoef(torch.stack([pooled, original]))[0, 1] > 0.9


def test_digits_test_split_is_fixed_and_train_split_follows_the_seed():
    a, b = build_data("digits", seed=0), build_data("digits", seed=1)
    assert a.test.indices == b.test.indices
    assert a.valid.indices != b.valid.indices
    assert build_data("digits", seed=1).valid.indices == b.valid.indices


def test_digits_training_transform_augments_but_evaluation_does_not():
    bundle = build_data("digits", valid_size=10)
    torch.manual_seed(0)
    crops = {tuple(bundle.train[0][0].flatten()[:600].tolist()) for _ in range(8)}
    assert len(crops) > 1
    assert torch.equal(bundle.valid[0][0], bundle.valid[0][0])


@pytest.mark.parametrize(("n", "valid", "expected"), [(10, 0.2, 2), (10, 3, 3), (10, 0, 0), (5, 0.5, 2)])
def test_split_indices_counts_and_partitions(n, valid, expected):
    train, held = split_indices(n, valid, seed=0)
    assert len(held) == expected and sorted(train + held) == list(range(n))


@pytest.mark.parametrize("valid", [10, 12, -1, 1.5])
def test_split_indices_rejects_impossible_sizes(valid):
    with pytest.raises(ValueError, match="valid_size"):
        split_indices(10, valid, seed=0)


def test_fake_cifar10_goes_through_torchvisions_loader(tmp_path, monkeypatch):
    md5s = write_fake_cifar10(tmp_path, per_batch=20, test_size=12)
    point_cifar10_at(monkeypatch, md5s)
    assert detect_dataset(tmp_path) == "cifar10"
    bundle = build_data("auto", tmp_path, valid_size=30, seed=0, download=False)
    assert bundle.name == "cifar10" and bundle.classes[0] == "airplane" and bundle.num_classes == 10
    assert (len(bundle.train), len(bundle.valid), len(bundle.test)) == (70, 30, 12)
    assert isinstance(bundle.train.dataset, CIFAR10)

    # A validation image is the pickled row, as torchvision decodes it, normalised with CIFAR-10 stats.
    index = bundle.valid.indices[0]
    batch = md5s["batches"][f"data_batch_{index // 20 + 1}"]
    row = batch[b"data"][index % 20].reshape(3, 32, 32)
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in CIFAR_STATS["cifar10"])
    expected = (torch.from_numpy(row).float() / 255 - mean) / std
    image, label = bundle.valid[0]
    assert label == batch[b"labels"][index % 20]
    assert torch.allclose(image, expected, atol=1e-6)
    # The test split is test_batch, in order.
    assert bundle.test[3][1] == md5s["batches"]["test_batch"][b"labels"][3]


def test_cifar_valid_size_zero_validates_on_the_test_set(tmp_path, monkeypatch):
    point_cifar10_at(monkeypatch, write_fake_cifar10(tmp_path, per_batch=4, test_size=6))
    bundle = build_data("cifar10", tmp_path, valid_size=0, download=False)
    assert len(bundle.train) == 20 and bundle.valid is bundle.test and len(bundle.valid) == 6


def test_cifar_missing_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR10 was not found .*cifar-10-batches-py.*--download"):
        build_data("cifar10", tmp_path, download=False)


def test_cifar_download_failure_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match=r"downloading it failed \(network is unreachable\); copy"):
        build_data("cifar10", tmp_path / "new", download=True)


def test_imagefolder_with_train_and_val_folders(tmp_path):
    write_image_folder(tmp_path / "train", per_class=5)
    write_image_folder(tmp_path / "val", per_class=2, seed=1)
    bundle = build_data("auto", tmp_path, image_size=32)
    assert bundle.name == "imagefolder" and bundle.classes == ["circle", "square"]
    assert (len(bundle.train), len(bundle.valid), bundle.test) == (10, 4, None)
    assert bundle.train[0][0].shape == bundle.valid[0][0].shape == (3, 32, 32)
    assert bundle.small_inputs


def test_imagefolder_single_folder_is_split(tmp_path):
    write_image_folder(tmp_path, classes=("a", "b", "c"), per_class=10)
    bundle = build_data("imagefolder", tmp_path, valid_size=0.2, image_size=64)
    assert bundle.num_classes == 3 and (len(bundle.train), len(bundle.valid)) == (24, 6)
    assert bundle.valid[0][0].shape == (3, 64, 64) and not bundle.small_inputs


def test_imagefolder_with_one_class_is_rejected(tmp_path):
    write_image_folder(tmp_path, classes=("only",), per_class=3)
    with pytest.raises(ValueError, match=r"has 1 class folder \(only\); a classifier needs at least 2"):
        build_data("imagefolder", tmp_path)


def test_imagefolder_val_classes_must_match(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b"), per_class=2)
    write_image_folder(tmp_path / "val", classes=("a", "c"), per_class=2)
    with pytest.raises(ValueError, match=r"class folders of .*val \(a, c\) differ .* \(a, b\)"):
        build_data("imagefolder", tmp_path)


def test_missing_data_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data("auto", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data("imagefolder", tmp_path / "nowhere")


def test_weights_preset_drives_the_imagefolder_transforms():
    from torchvision.models import DenseNet121_Weights

    preset = DenseNet121_Weights.IMAGENET1K_V1.transforms()
    train_tf, eval_tf, crop = imagenet_transforms(preset)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    assert crop == 224 and train_tf(image).shape == (3, 224, 224)
    # Evaluation is the weights' own preset, exactly.
    assert torch.allclose(eval_tf(image), preset(image), atol=1e-6)
    # A preset without attributes falls back to ImageNet's resize 256 / crop 224.
    _, fallback, crop = imagenet_transforms(SimpleNamespace())
    assert crop == 224 and torch.allclose(fallback(image), preset(image), atol=1e-5)


# -- hostile ImageFolders ---------------------------------------------------------------------------


def test_imagefolder_counts_each_real_file_once_through_a_link_loop(tmp_path):
    root = write_image_folder(tmp_path / "if_good", classes=("a", "b"), per_class=12, size=16)
    plain = build_data("imagefolder", root, valid_size=0.25, image_size=8)
    (root / "a" / "loop").symlink_to("../a")  # the reporter's `ln -s ../a if_good/a/loop`
    (root / "b" / "again.png").symlink_to(root / "b" / "0.png")  # the same file twice in a class
    bundle = build_data("imagefolder", root, valid_size=0.25, image_size=8)
    assert len(bundle.train) + len(bundle.valid) == 24
    folder = bundle.train.dataset
    real = [os.path.realpath(p) for p, _ in folder.samples]
    assert len(set(real)) == len(real) == 24
    # Without duplicates, the split is the one the folder had before the links.
    assert folder.samples == plain.train.dataset.samples
    assert not {real[i] for i in bundle.train.indices} & {real[i] for i in bundle.valid.indices}


def test_imagefolder_file_in_two_classes_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=3, size=16)
    (root / "b" / "stray.png").symlink_to(root / "a" / "1.png")
    with pytest.raises(
        ValueError, match=r"are the same file .* in classes 'b' and 'a'; each image must belong"
    ):
        build_data("imagefolder", root, image_size=8)


def _write_hostile(folder, monkeypatch) -> dict[str, str]:
    """One of each unusable file into ``folder``; returns name -> what the refusal must say."""
    good = (folder / "0.png").read_bytes()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "photo.jpg")
    jpeg = (folder / "photo.jpg").read_bytes()
    (folder / "photo.jpg").unlink()
    (folder / "text.jpg").write_text("not an image\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    # Stand-ins for a 20000x20000 PNG: the limit lowered instead of writing 400 megapixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "huge.png")  # 1600 px: over the limit
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(folder / "bomb.png")  # 2500 px: PIL refuses to open
    return {
        "text.jpg": "UnidentifiedImageError",
        "empty.jpg": "UnidentifiedImageError",
        "cut.jpg": "OSError: Truncated",
        "cut.png": "OSError: ",
        "huge.png": "40x40 pixels, over PIL's limit of 1,000",
        "bomb.png": "exceeds limit",
    }


@pytest.mark.parametrize("layout", ["single", "val"])
def test_imagefolder_unusable_images_are_refused_up_front_by_name(tmp_path, monkeypatch, layout):
    root = tmp_path / "data"
    if layout == "single":
        write_image_folder(root, classes=("a", "b"), per_class=4, size=16)
        folder = root / "a"
    else:  # the check covers val/ (and test/) too
        write_image_folder(root / "train", classes=("a", "b"), per_class=4, size=16)
        write_image_folder(root / "val", classes=("a", "b"), per_class=2, size=16)
        folder = root / "val" / "b"
    expected = _write_hostile(folder, monkeypatch)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError) as info:
        build_data("imagefolder", root, image_size=8)
    message = str(info.value)
    assert message.startswith(f"{len(expected)} of the ") and "cannot be used" in message
    assert message.endswith("; and 1 more; remove or replace them")  # five named, the count of the rest
    named = [name for name in expected if str(folder / name) in message]
    assert len(named) == 5
    for name in named:
        assert expected[name].lower() in message.split(str(folder / name))[1].split(";")[0].lower(), name
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing deleted or moved
