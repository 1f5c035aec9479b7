"""Data sets, splits and transforms for ``densenet-efficient train``.

Three sources, one :class:`DataBundle` shape (train / valid / optional test, class names, the
input size the model sees):

* ``digits`` (the embedded default): scikit-learn's bundled copy of the UCI handwritten digits
  (1,797 real 8x8 grey-scale scans, 10 classes), shipped inside the scikit-learn wheel, so it
  works offline on a fresh machine. Upsampled to 3x32x32 so it feeds a CIFAR DenseNet-BC.
* ``cifar10`` / ``cifar100``: torchvision's dataset classes (downloaded where the network allows),
  with the original efficient-DenseNet demo's augmentation and split.
* ``imagefolder``: a folder of class sub-folders (``train/`` + ``val/``, or one folder split by
  ``valid_size``), preprocessed like the pretrained weights were. Each real image counts once
  (link loops add nothing) and every image is decoded up front: unusable files are refused by
  name before training (see :class:`_ImageFolder`).

>>> from densenet_efficient.training.data import build_data
>>> bundle = build_data("digits", valid_size=200)
>>> bundle.num_classes, len(bundle.train), len(bundle.valid), len(bundle.test)
(10, 1237, 200, 360)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from ..errors import UsageError
from ..io.files import require_regular_file
from ..models.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DATASETS",
    "DATA_DEFAULTS",
    "DataBundle",
    "ImageChangedError",
    "TransformedSubset",
    "build_data",
    "detect_dataset",
    "imagenet_transforms",
    "load_image",
    "mix_seed",
    "split_indices",
]

DATASETS = ("auto", "digits", "cifar10", "cifar100", "imagefolder")

#: The settings whose default depends on the data, per data set: the one place they are written
#: (``build_data``, ``training.config.resolve_config`` and ``train --help`` all read them here).
#: The CIFAR ones are the original demo's (a valid size of 0 validates on the test set); the digits
#: ones give a run of a few minutes on a 2-core laptop CPU; ImageFolders are cropped to the size of
#: the ImageNet preset unless pretrained weights bring their own.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"depth": 22, "n_epochs": 15, "workers": 0, "valid_size": 0.1},
    "cifar10": {"depth": 100, "n_epochs": 300, "valid_size": 5000},
    "cifar100": {"depth": 100, "n_epochs": 300, "valid_size": 5000},
    "imagefolder": {"depth": 100, "n_epochs": 30, "valid_size": 0.1, "image_size": 224},
}

# Per-channel statistics of the CIFAR training sets (the usual published values).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

#: Images of the embedded digits set held out as a fixed test split (independent of ``--seed``).
DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


@dataclass
class DataBundle:
    """What a training run needs to know about its data."""

    name: str
    train: Dataset
    valid: Dataset | None
    test: Dataset | None
    classes: list[str]
    image_size: int  # height = width of the tensors the model sees
    small_inputs: bool  # True for 32x32 data (CIFAR stem), False for ImageNet-sized crops

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def mix_seed(seed: int, salt: int, modulus: int = 2**31) -> int:
    """One seed from a run's ``seed`` and a ``salt`` (an epoch, an image index): the one mix every
    per-epoch and per-image generator is seeded with, so their streams never coincide.

    >>> mix_seed(0, 5), mix_seed(1, 0)
    (5, 1000003)
    """
    return (seed * 1_000_003 + salt) % modulus


class TransformedSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image.

    Lets the training and validation parts of one split share a single underlying data set (read
    once) while using different transforms (augmentation only on the training part).

    After :meth:`set_seed`, the random transform of item ``i`` draws from a generator seeded by
    ``(seed, i)`` alone: augmentation then does not depend on the number of DataLoader workers or
    on which worker loads an item, so a run resumed with other ``--workers`` sees the same images.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable | None) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.seed: int | None = None

    def set_seed(self, seed: int | None) -> None:
        """Seed the augmentation of the next pass (call before each epoch; None: global RNG)."""
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, target = self.dataset[self.indices[i]]
        if self.transform is None:
            return image, int(target)
        if self.seed is None:
            return self.transform(image), int(target)
        # torchvision's transforms draw from torch's global CPU RNG: save and restore it so the
        # caller's stream (dropout in the main process when workers=0) is unaffected. (Only the CPU
        # generator: torch.manual_seed would also poke every accelerator backend, ~2 ms a call.)
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(mix_seed(self.seed, i, 2**62))
        try:
            return self.transform(image), int(target)
        finally:
            torch.set_rng_state(state)


class _TensorImages(Dataset):
    """Images already held as a uint8 tensor ``(N, 3, H, W)`` plus integer labels."""

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.targets[i])


def split_indices(n: int, valid_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffle ``range(n)`` with ``seed`` and hold out ``valid_size`` items (a count, or a fraction < 1).

    >>> split_indices(10, 0.2, seed=0)[1].__len__()
    2
    """
    if isinstance(valid_size, float) and 0 < valid_size < 1:
        count = int(round(n * valid_size))
    elif float(valid_size) == int(valid_size) and valid_size >= 0:
        count = int(valid_size)
    else:
        raise UsageError(f"valid_size must be a count >= 0 or a fraction in (0, 1), got {valid_size!r}")
    if count >= n:
        raise UsageError(f"valid_size={valid_size!r} holds out {count} of only {n} training images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[: n - count], order[n - count :]


# -- the embedded default: scikit-learn's digits ----------------------------------------------------


def _digits_tensors() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # declared in install_requires; this only catches broken installs
        raise ImportError(
            "the embedded default data set is scikit-learn's digits: pip install scikit-learn"
        ) from err
    digits = load_digits()
    # 8x8 intensities in 0..16 -> uint8 0..255, bilinearly upsampled to 32x32 and repeated over RGB.
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.as_tensor(digits.target, dtype=torch.long)


def _build_digits(valid_size: int | float, seed: int) -> DataBundle:
    images, targets = _digits_tensors()
    full = _TensorImages(images, targets)
    # A fixed test split (seed 0, whatever --seed) so test figures are comparable across runs.
    pool, test_idx = split_indices(len(full), DIGITS_TEST_SIZE, _DIGITS_SPLIT_SEED)
    mean = float(images[pool].float().mean() / 255)
    std = float(images[pool].float().std() / 255)
    normalize = T.Normalize((mean,) * 3, (std,) * 3)
    to_float = T.ConvertImageDtype(torch.float32)
    # No horizontal flip: digits are not mirror-symmetric. Shifts of up to one original pixel.
    train_tf = T.Compose([T.RandomCrop(32, padding=4), to_float, normalize])
    eval_tf = T.Compose([to_float, normalize])
    train_pos, valid_pos = split_indices(len(pool), valid_size, seed)
    train_idx = [pool[i] for i in train_pos]
    valid_idx = [pool[i] for i in valid_pos]
    return DataBundle(
        name="digits",
        train=TransformedSubset(full, train_idx, train_tf),
        valid=TransformedSubset(full, valid_idx, eval_tf) if valid_idx else None,
        test=TransformedSubset(full, test_idx, eval_tf),
        classes=[str(i) for i in range(10)],
        image_size=32,
        small_inputs=True,
    )


# -- CIFAR --------------------------------------------------------------------------------------


def _cifar_dataset(name: str, root: Path, train: bool, download: bool) -> datasets.CIFAR10:
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    for file_name, _ in (*cls.train_list, *cls.test_list):  # torchvision hashes them: a FIFO blocks
        if os.path.lexists(root / cls.base_folder / file_name):
            require_regular_file(root / cls.base_folder / file_name, f"{name.upper()} batch")
    if os.path.lexists(root / cls.filename):
        require_regular_file(root / cls.filename, f"{name.upper()} archive")
    try:
        return cls(str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name.upper()} was not found (or failed its checksum) in {root}: expected "
            f"{root / cls.base_folder}/ as extracted from {cls.filename}"
            + ("" if download else "; pass --download to fetch it")
            + f" ({err})"
        ) from None
    except OSError as err:  # no network, DNS failure, refused connection...
        raise FileNotFoundError(
            f"{name.upper()} is not in {root} and downloading it failed ({err}); copy "
            f"{cls.filename} or its extracted {cls.base_folder}/ folder there"
        ) from None


def _build_cifar(name: str, root: Path, valid_size: int | float, seed: int, download: bool) -> DataBundle:
    if not root.exists():
        if not download:
            raise FileNotFoundError(f"data directory {root} does not exist")
        root.mkdir(parents=True)
    mean, std = CIFAR_STATS[name]
    normalize = T.Normalize(mean, std)
    # The original demo's augmentation: 4-pixel padded random crops and horizontal flips.
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    eval_tf = T.Compose([T.ToTensor(), normalize])
    train_set = _cifar_dataset(name, root, True, download)
    test_set = _cifar_dataset(name, root, False, download)
    train_idx, valid_idx = split_indices(len(train_set), valid_size, seed)
    test = TransformedSubset(test_set, range(len(test_set)), eval_tf)
    return DataBundle(
        name=name,
        train=TransformedSubset(train_set, train_idx, train_tf),
        # valid_size=0: validate on the test set, as the original demo did.
        valid=TransformedSubset(train_set, valid_idx, eval_tf) if valid_idx else test,
        test=test,
        classes=list(train_set.classes),
        image_size=32,
        small_inputs=True,
    )


# -- ImageFolder ----------------------------------------------------------------------------------


def imagenet_transforms(preset: Any = None, image_size: int | None = None) -> tuple[Callable, Callable, int]:
    """``(train_transform, eval_transform, crop_size)`` following pretrained weights' preprocessing.

    ``preset`` is what ``weights.transforms()`` returns (torchvision's ``ImageClassification``:
    ``resize_size``, ``crop_size``, ``mean``, ``std``, ``interpolation``); without one, the
    ImageNet preset (resize 256, centre crop 224, ImageNet mean/std). ``image_size`` overrides the
    crop size (the resize keeps the 256:224 ratio). Training uses random-resized crops and flips
    at the crop size with the same normalisation.
    """
    crop = _first_int(getattr(preset, "crop_size", None), DATA_DEFAULTS["imagefolder"]["image_size"])
    resize = _first_int(getattr(preset, "resize_size", None), 256)
    mean = tuple(getattr(preset, "mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(preset, "std", None) or IMAGENET_STD)
    interpolation = getattr(preset, "interpolation", T.InterpolationMode.BILINEAR)
    if image_size is not None:
        resize, crop = max(image_size, round(image_size * resize / crop)), image_size
    normalize = T.Normalize(mean, std)
    train_tf = T.Compose(
        [
            T.RandomResizedCrop(crop, interpolation=interpolation),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
        ]
    )
    if preset is not None and image_size is None and callable(preset):
        # The weights' own eval preset, exactly (it accepts PIL images and returns normalised tensors).
        eval_tf = preset
    else:
        eval_tf = T.Compose(
            [T.Resize(resize, interpolation=interpolation), T.CenterCrop(crop), T.ToTensor(), normalize]
        )
    return train_tf, eval_tf, crop


def _first_int(value: Any, default: int) -> int:
    if value is None:
        return default
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


#: 16-bit integer modes PIL opens 16-bit grey PNGs and TIFFs in. ``convert("RGB")`` clips their
#: values to 255 (a 16-bit X-ray becomes almost all white); they are scaled to 8 bits instead.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _pixel_problem(image: Image.Image) -> str | None:
    """Why ``image``'s pixels cannot be mapped onto 0..255 faithfully (None when they can)."""
    if image.mode in ("I", "F", "I;16S") or image.mode.startswith(("I;32", "F;")):
        kind = "floating-point" if image.mode.startswith("F") else "32-bit or signed integer"
        return (
            f"{kind} pixels (PIL mode {image.mode}) have no fixed range to scale to 0..255, and "
            "clipping them would change the image; export it as 8- or 16-bit"
        )
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: 16-bit grey scaled by 255/65535 (never clipped), everything else as
    PIL's ``convert("RGB")`` (palette, CMYK, grey+alpha, ...)."""
    if image.mode in _SIXTEEN_BIT:
        pixels = np.asarray(image).astype(np.uint32)  # native order whatever the file's
        scaled = ((pixels * 255 + 32767) // 65535).astype(np.uint8)  # rounded: 65535 -> 255
        return Image.fromarray(scaled).convert("RGB")  # 2-D uint8: mode L
    return image.convert("RGB")


class ImageChangedError(UsageError):
    """An image that passed the check before training cannot be read when its epoch comes."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's exception is raised again in the main process as
        # ``type(err)(text)``, the text being "Caught ... in DataLoader worker process N", the
        # worker's traceback, then "<module>.ImageChangedError: <message>": keep the message.
        if message.startswith("Caught ImageChangedError") and "Error: " in message:
            message = message.rstrip().rsplit("ImageChangedError: ", 1)[-1]
        super().__init__(message)


def load_image(path: str) -> Image.Image:
    """The 8-bit RGB image the model sees for ``path`` (ImageFolders' loader, see :func:`_to_rgb`).

    Raises:
        ImageChangedError: the file cannot be read now (it passed the check before training, so
            it was replaced, truncated or removed since), naming it.
    """
    try:
        require_regular_file(path, "image")  # a FIFO put there since would block a worker forever
        with Image.open(path) as image:
            problem = _pixel_problem(image)
            if problem is None:
                return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # UsageError is a ValueError
        problem = f"{type(err).__name__}: {err}"
    raise ImageChangedError(
        f"{path} cannot be read any more ({problem}); it passed the check before training, so it "
        "changed since: the last checkpoint is kept, restore or remove the file and continue with --resume"
    )


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, safe against hostile folders.

    * Each real file counts once: sub-folders are followed through symbolic links (as torchvision
      does) but a folder already walked (by its resolved path) is not walked again, so a link
      loop such as ``a/loop -> ../a`` adds nothing, and a file reached twice within a class (by
      links) is kept once. One real file in two classes is refused (it would be labelled twice
      and could land on both sides of the train/valid split).
    * Every image is opened and decoded up front (JPEGs at 1/8 scale, which still reads all of
      the data), so a file that is not an image, is empty or truncated, or is larger than
      ``PIL.Image.MAX_IMAGE_PIXELS`` is refused before training, naming the files, instead of
      failing mid-epoch (in a DataLoader worker). Refused, not skipped: a data set silently
      smaller than the folder would give numbers for other data than the user pointed at. A
      FIFO or device named like an image is refused without being opened (it would block).
    * Images are read by :func:`load_image`: 16-bit grey (medical exports) is scaled to 8 bits,
      never clipped; pixels of no fixed range (32-bit, float) are refused by name.

    Samples are in torchvision's order (sorted folders, then sorted names), so splits are
    unchanged for well-formed folders.
    """

    @staticmethod
    def make_dataset(
        directory: str | os.PathLike,
        class_to_idx: dict[str, int] | None = None,
        extensions: str | tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        if class_to_idx is None:
            class_to_idx = datasets.folder.find_classes(directory)[1]
        if is_valid_file is None:
            exts = extensions or datasets.folder.IMG_EXTENSIONS

            def is_valid_file(path: str) -> bool:
                return datasets.folder.has_file_allowed_extension(path, exts)

        owner: dict[str, tuple[str, str]] = {}  # real file -> (class, the path it was found as)
        samples = []
        for target in sorted(class_to_idx):
            for path in _walk_once(Path(directory) / target):
                if not is_valid_file(path):
                    continue
                real = os.path.realpath(path)
                if real in owner:
                    first_class, first_path = owner[real]
                    if first_class != target:
                        raise UsageError(
                            f"{path} and {first_path} are the same file ({real}) in classes {target!r} "
                            f"and {first_class!r}; each image must belong to one class"
                        )
                    continue  # the same file again within its class (links): once is enough
                owner[real] = (target, path)
                samples.append((path, class_to_idx[target]))
        empty = sorted(set(class_to_idx) - {c for c, _ in owner.values()})
        if empty and not allow_empty:
            raise FileNotFoundError(
                f"no images in the class folder(s) {', '.join(empty)} of {directory} "
                f"(expected files ending in {', '.join(datasets.folder.IMG_EXTENSIONS)})"
            )
        return samples


def _walk_once(top: Path) -> list[str]:
    """The files under ``top`` (following links), each real folder walked once, in torchvision's
    order: folders sorted by path, files sorted by name."""
    seen: set[str] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back to a folder already walked: do not descend again
            dirnames.clear()
            continue
        seen.add(real)
        found.append((dirpath, sorted(filenames)))
    return [os.path.join(d, f) for d, names in sorted(found) for f in names]


def _image_problem(path: str) -> str | None:
    """Why ``path`` cannot be trained on (None if it decodes within the size limit)."""
    try:
        require_regular_file(path, "image")  # a FIFO named like an image would block Image.open
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below instead
            with Image.open(path) as image:
                width, height = image.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit and width * height > limit:
                    return f"{width}x{height} pixels, over PIL's limit of {limit:,}"
                problem = _pixel_problem(image)
                if problem is not None:
                    return problem
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # JPEG: 1/8-scale decode
                image.load()
    except Image.DecompressionBombError as err:
        return str(err).split(" could be")[0].rstrip(",")  # over twice the limit: PIL refuses to open
    except UsageError as err:  # not a regular file: the sentence already names the path
        return str(err).rsplit(": ", 1)[-1]
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # not an image, empty, truncated
        return f"{type(err).__name__}: {err}"
    return None


def _check_images(folder: datasets.ImageFolder, root: Path) -> None:
    """Refuse ``folder`` naming its unreadable images (see :class:`_ImageFolder`)."""
    paths = [path for path, _ in folder.samples]
    # PIL decodes without the GIL: threads make this a fraction of one epoch's decoding.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = [(p, why) for p, why in zip(paths, pool.map(_image_problem, paths), strict=True) if why]
    if problems:
        shown = "; ".join(f"{p} ({why})" for p, why in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UsageError(
            f"{len(problems)} of the {len(paths)} image files in {root} cannot be used: {shown}{more}; "
            "remove or replace them"
        )


def _load_folder(root: Path) -> datasets.ImageFolder:
    """An :class:`_ImageFolder` of ``root``, its images checked."""
    folder = _ImageFolder(str(root), loader=load_image)  # FileNotFoundError: empty/classless folders
    _check_images(folder, root)
    return folder


def _image_folder(root: Path) -> datasets.ImageFolder:
    folder = _load_folder(root)
    if len(folder.classes) < 2:
        raise UsageError(
            f"ImageFolder {root} has {len(folder.classes)} class folder ({', '.join(folder.classes)}); "
            "a classifier needs at least 2 class sub-folders, one per class"
        )
    return folder


def _find_split(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _build_imagefolder(
    root: Path, valid_size: int | float, seed: int, preset: Any, image_size: int | None
) -> DataBundle:
    train_tf, eval_tf, crop = imagenet_transforms(preset, image_size)
    train_dir = _find_split(root, ("train", "training"))
    if train_dir is None:  # one folder of classes: split it
        full = _image_folder(root)
        train_idx, valid_idx = split_indices(len(full), valid_size, seed)
        train = TransformedSubset(full, train_idx, train_tf)
        valid = TransformedSubset(full, valid_idx, eval_tf) if valid_idx else None
        test, classes = None, full.classes
    else:
        full = _image_folder(train_dir)
        classes = full.classes
        valid_dir = _find_split(root, ("val", "valid", "validation"))
        if valid_dir is None:
            train_idx, valid_idx = split_indices(len(full), valid_size, seed)
            train = TransformedSubset(full, train_idx, train_tf)
            valid = TransformedSubset(full, valid_idx, eval_tf) if valid_idx else None
        else:
            train = TransformedSubset(full, range(len(full)), train_tf)
            valid = _matching_split(valid_dir, classes, eval_tf)
        test_dir = _find_split(root, ("test",))
        test = _matching_split(test_dir, classes, eval_tf) if test_dir else None
    return DataBundle("imagefolder", train, valid, test, list(classes), crop, small_inputs=crop < 64)


def _matching_split(path: Path, classes: list[str], transform: Callable) -> TransformedSubset:
    folder = _load_folder(path)
    if folder.classes != classes:
        raise UsageError(
            f"class folders of {path} ({', '.join(folder.classes)}) differ from the training "
            f"folder's ({', '.join(classes)})"
        )
    return TransformedSubset(folder, range(len(folder)), transform)


# -- entry point ----------------------------------------------------------------------------------


def detect_dataset(data_dir: str | os.PathLike | None) -> str:
    """Which kind of data ``data_dir`` holds: ``digits`` (no directory), ``cifar10``/``cifar100``
    (torchvision's extracted folders or archives) or ``imagefolder``."""
    if data_dir is None:
        return "digits"
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} does not exist; to download CIFAR into it, pass --dataset cifar10 "
            "(or cifar100)"
        )
    if (root / "cifar-10-batches-py").is_dir() or (root / "cifar-10-python.tar.gz").is_file():
        return "cifar10"
    if (root / "cifar-100-python").is_dir() or (root / "cifar-100-python.tar.gz").is_file():
        return "cifar100"
    return "imagefolder"


def build_data(
    dataset: str = "auto",
    data_dir: str | os.PathLike | None = None,
    *,
    valid_size: int | float | None = None,
    seed: int = 0,
    download: bool = False,
    preset: Any = None,
    image_size: int | None = None,
) -> DataBundle:
    """Build the train/valid/test data sets for a run.

    Args:
        dataset: one of :data:`DATASETS`; ``"auto"`` picks from ``data_dir`` (see
            :func:`detect_dataset`).
        data_dir: where the data lives (CIFAR: the folder holding ``cifar-10-batches-py``).
        valid_size: images held out of the training set for validation, a count or a fraction
            (default: :data:`DATA_DEFAULTS`' ``valid_size``: 5000 for CIFAR, as the original demo;
            10% for ``digits`` and ImageFolders).
        seed: seeds the train/valid split.
        download: let torchvision download CIFAR if it is missing.
        preset: the pretrained weights' eval transforms (``weights.transforms()``), for ImageFolders.
        image_size: crop size for ImageFolders (default: the preset's, else 224); the digits and
            CIFAR images are 32x32 and refuse another size.
    """
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if dataset == "auto":
        dataset = detect_dataset(data_dir)
    if image_size is not None and dataset != "imagefolder":
        raise UsageError(
            f"image_size={image_size!r} applies to ImageFolders; the {dataset} images are 32x32 and are "
            "not resized (drop it)"
        )
    if valid_size is None:
        valid_size = DATA_DEFAULTS[dataset]["valid_size"]
    if dataset == "digits":
        return _build_digits(valid_size, seed)
    if data_dir is None:
        raise UsageError(f"dataset {dataset!r} needs a data directory (--data DIR)")
    root = Path(data_dir).expanduser()
    if dataset in CIFAR_STATS:
        return _build_cifar(dataset, root, valid_size, seed, download)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist (expected an ImageFolder)")
    return _build_imagefolder(root, valid_size, seed, preset, image_size)
