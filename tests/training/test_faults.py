"""Review round three, training: folders that hold the user's files, two runs at once, data whose
classes changed, non-finite validation, 16-bit and special-file images, an image that changes
mid-run, and a terminal that cannot show a path.

Every input is the test's own. "Untouched" is checked byte for byte on the folder; a hang is
bounded by an alarm, so a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densenet_efficient.errors import UsageError
from densenet_efficient.training import train
from densenet_efficient.training.checkpoint import RUN_MARKER, check_run_folder
from densenet_efficient.training.config import NonFiniteLossError, check_settings
from densenet_efficient.training.data import ImageChangedError, build_data, load_image

from ..support import REPO
from ..support.fakedata import write_image_folder
from ..support.timeouts import within


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny(tmp_path: Path, **kw):
    data = tmp_path / "flowers"
    if not data.exists():
        write_image_folder(data, classes=("a", "b", "c"), per_class=3, size=8)
    base = dict(data=str(data), depth=10, growth_rate=4, batch_size=4, valid_size=3, image_size=8,
                n_epochs=2, save=str(tmp_path / "run"), progress=False, workers=0)  # fmt: skip
    return {**base, **kw}


# -- 1. the run folder is the run's own -------------------------------------------------------------


@pytest.mark.parametrize("users_file", ["log.csv", "best/README.md", "last/config.json", "checkpoint.pt"])
def test_a_folder_holding_files_of_the_runs_names_is_refused_and_untouched(tmp_path, users_file):
    save = tmp_path / "run"
    (save / users_file).parent.mkdir(parents=True, exist_ok=True)
    (save / users_file).write_text("the user's own, not a run's\n")
    before = _snapshot(save)
    # (a file named checkpoint.pt is first taken for a run: refused, naming --resume/--overwrite)
    with pytest.raises(FileExistsError if users_file == "checkpoint.pt" else UsageError, match="already holds"):
        train(**_tiny(tmp_path))
    with pytest.raises(UsageError, match=rf"already holds .*{users_file.split('/')[0]}.*no training run of this package wrote"):
        train(**_tiny(tmp_path, overwrite=True))  # --overwrite is for the package's own runs
    assert _snapshot(save) == before and not (save / RUN_MARKER).exists()


def test_a_folder_of_other_files_is_claimed_and_they_survive(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    (save / "notes.txt").write_text("mine")
    train(**_tiny(tmp_path, n_epochs=1))
    assert (save / "notes.txt").read_text() == "mine"
    assert (save / RUN_MARKER).is_file() and (save / "checkpoint.pt").is_file()
    # the package's own run: continued and overwritten as before
    train(**_tiny(tmp_path, n_epochs=2, resume=True))
    train(**_tiny(tmp_path, n_epochs=1, overwrite=True))
    assert (save / "notes.txt").read_text() == "mine"


@pytest.fixture
def finished(tmp_path) -> Path:
    """A run of 1 of 2 epochs, in tmp_path/run."""
    train(**_tiny(tmp_path, stop_after=1))
    return tmp_path / "run"


@pytest.mark.parametrize("name", ["last", "best", "log.csv"])
def test_a_link_among_the_runs_own_names_is_not_written_through(finished, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("someone else's")
    target = finished / name
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
    else:
        target.unlink()
    os.symlink(elsewhere if name != "log.csv" else elsewhere / "config.json", target)
    before = _snapshot(elsewhere)
    with pytest.raises(UsageError, match=rf"its {name} is a symbolic link .* remove the link"):
        train(**_tiny(tmp_path, resume=True))
    assert _snapshot(elsewhere) == before


def test_a_run_of_a_version_before_the_marker_is_still_the_packages(finished, tmp_path):
    (finished / RUN_MARKER).unlink()  # as an earlier version left its run folders
    train(**_tiny(tmp_path, resume=True))
    assert (finished / RUN_MARKER).is_file()
    assert torch.load(finished / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_a_fifo_where_the_checkpoint_should_be_is_refused_without_blocking(finished, tmp_path):
    (finished / "checkpoint.pt").unlink()
    os.mkfifo(finished / "checkpoint.pt")
    with within(30), pytest.raises(UsageError, match=r"checkpoint.pt: it is a FIFO \(named pipe\)"):
        train(**_tiny(tmp_path, resume=True))


# -- 3. two runs into one folder --------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from densenet_efficient.training.checkpoint import check_run_folder
    folder = check_run_folder(Path(sys.argv[1]), overwrite=True)
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes our stdin, or kills us
    """
)


def _hold(save: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(save)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_run_into_a_folder_another_process_holds_is_refused(finished, tmp_path):
    before = _snapshot(finished)
    holder = _hold(finished)
    try:
        for options in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(UsageError, match="is in use by another training run"):
                train(**_tiny(tmp_path, **options))
        assert _snapshot(finished) == before
    finally:
        holder.kill()  # killed, not ended: its lock dies with it
        holder.wait()
    train(**_tiny(tmp_path, resume=True))
    assert torch.load(finished / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_a_new_folder_another_process_is_setting_up_is_not_taken(tmp_path):
    save = tmp_path / "run"
    holder = _hold(save)  # claimed, nothing saved yet: the first run's first epoch
    try:
        with pytest.raises(UsageError, match="is in use by another training run"):
            train(**_tiny(tmp_path))
        assert sorted(os.listdir(save)) == [RUN_MARKER]
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_checkpoint_written_while_a_run_was_set_up_is_not_overwritten(finished, tmp_path, monkeypatch):
    """The other run finished between this one's first look and its claim of the folder."""
    import densenet_efficient.training.loop as loop

    (finished / "checkpoint.pt").rename(tmp_path / "aside.pt")
    real = loop._check_run_folder

    def other_run_finishes_first(*args, **kwargs):
        (tmp_path / "aside.pt").rename(finished / "checkpoint.pt")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_check_run_folder", other_run_finishes_first)
    before = None
    with pytest.raises(FileExistsError, match="written while this one was being set up"):
        before = _snapshot(finished)
        train(**_tiny(tmp_path))
    assert torch.load(finished / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert before is not None


def test_a_refused_or_failed_fresh_run_leaves_no_folder(tmp_path, monkeypatch):
    import densenet_efficient.training.loop as loop

    def diverge(*args, **kwargs):
        raise NonFiniteLossError("the training loss became nan")

    monkeypatch.setattr(loop, "_forward_backward", diverge)
    with pytest.raises(NonFiniteLossError):
        train(**_tiny(tmp_path))
    assert not (tmp_path / "run").exists()


# -- 4. the classes a run was trained on ------------------------------------------------------------


def test_resuming_on_data_whose_classes_changed_is_refused(finished, tmp_path):
    before = _snapshot(finished)
    data = tmp_path / "flowers"
    (data / "b").rename(data / "d")  # label 1 was b; sorted, it is now c (and d is label 2)
    with pytest.raises(UsageError, match=r"trained on 3 classes \['a', 'b', 'c'\].*label 1 is 'b' in the run and 'c'"):
        train(**_tiny(tmp_path, resume=True))
    (data / "d").rename(data / "b")
    (data / "e").mkdir()
    write_image_folder(data, classes=("e",), per_class=3, size=8)
    with pytest.raises(UsageError, match="label 3 is nothing in the run and 'e' in the data"):
        train(**_tiny(tmp_path, resume=True))
    assert _snapshot(finished) == before
    assert torch.load(finished / "checkpoint.pt", weights_only=True)["classes"] == ["a", "b", "c"]


def test_stored_classes_of_the_wrong_type_are_refused(finished, tmp_path):
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    ckpt["classes"] = ["a", 1, None]
    torch.save(ckpt, finished / "checkpoint.pt")
    with pytest.raises(UsageError, match="its classes are .*expected a list of class names"):
        train(**_tiny(tmp_path, resume=True))


# -- 5. non-finite validation --------------------------------------------------------------------


def test_a_non_finite_validation_loss_is_never_saved(finished, tmp_path, monkeypatch):
    before = _snapshot(finished)
    real = torch.nn.functional.cross_entropy

    def nan_when_validating(out, y, *args, **kwargs):  # training calls loop._loss_fn, bound at import
        return real(out, y, *args, **kwargs) * math.nan

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_when_validating)
    with pytest.raises(NonFiniteLossError, match="the validation loss is nan in epoch 2.*nothing of this epoch is saved"):
        train(**_tiny(tmp_path, resume=True))
    assert _snapshot(finished) == before


def test_a_huge_learning_rate_ends_with_no_model_saved(tmp_path):
    # 1e30 overflows the weights: the run stops (training or validation loss) and saves nothing
    with pytest.raises(NonFiniteLossError, match="loss"):
        train(**_tiny(tmp_path, lr=1e30, n_epochs=1))
    assert not (tmp_path / "run").exists()


# -- 12. numbers beyond float32 ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [("lr", 1e39), ("weight_decay", 3.5e38), ("lr", 1e300)])
def test_rates_beyond_float32_are_refused_before_anything_is_written(tmp_path, name, value):
    with pytest.raises(UsageError, match=rf"--{name.replace('_', '-')} must be at most 3.4"):
        train(**_tiny(tmp_path, **{name: value}))
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match="at most"):
        check_settings({name: value})
    check_settings({name: 1e38})  # within float32: accepted


# -- 6. 16-bit and other deep images --------------------------------------------------------------


def _grey16(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    for name, data in (("png", values), ("tif", values)):
        image = load_image(str(_grey16(tmp_path / f"x.{name}", data)))
        pixels = np.asarray(image)
        assert image.mode == "RGB" and pixels.shape == (64, 64, 3)
        expected = np.round(values.astype(np.uint16).astype(np.float64) * 255 / 65535)
        assert np.abs(pixels[..., 0] - expected).max() <= 1
        assert (pixels == 255).mean() < 0.01  # clipped, 99% of these pixels would be white
    # a 12-bit export in a 16-bit PNG keeps its contrast order (dark, not clipped to white)
    twelve = load_image(str(_grey16(tmp_path / "x12.png", np.arange(4096).reshape(64, 64))))
    assert np.asarray(twelve).max() == round(4095 * 255 / 65535)


def test_a_folder_of_16_bit_x_rays_trains_on_its_values(tmp_path):
    root = tmp_path / "xray"
    rng = np.random.default_rng(0)
    for cls in ("normal", "effusion"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _grey16(root / cls / f"{i}.png", rng.integers(0, 65536, (16, 16)))
    bundle = build_data("imagefolder", root, valid_size=0, image_size=8)
    image, _ = bundle.train.dataset[0]
    assert isinstance(image, Image.Image) and 0 < np.asarray(image).mean() < 200


def test_pixels_of_no_fixed_range_are_refused_by_name(tmp_path):
    root = write_image_folder(tmp_path / "f", classes=("a", "b"), per_class=2, size=8)
    Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(root / "a" / "float.tif")
    with pytest.raises(UsageError, match=r"float.tif \(floating-point pixels \(PIL mode F\) have no fixed range"):
        build_data("imagefolder", root, valid_size=0)


# -- 9. special files where an image is expected ---------------------------------------------------


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    root = write_image_folder(tmp_path / "f", classes=("a", "b"), per_class=2, size=8)
    os.mkfifo(root / "a" / "pipe.png")
    with within(20), pytest.raises(UsageError, match=r"pipe.png \(it is a FIFO \(named pipe\), expected a regular file\)"):
        build_data("imagefolder", root, valid_size=0)


# -- 13. an image that changes after the check ---------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_changed_after_the_check_is_one_sentence_naming_it(tmp_path, workers):
    root = write_image_folder(tmp_path / "f", classes=("a", "b"), per_class=2, size=8)
    bundle = build_data("imagefolder", root, valid_size=0, image_size=8)
    (root / "a" / "0.png").write_bytes(b"no longer a PNG")
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=4, num_workers=workers)
    with within(60), pytest.raises(ImageChangedError) as caught:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"{root / 'a' / '0.png'} cannot be read any more") and "--resume" in message
    assert isinstance(caught.value, UsageError)  # the command line: one line, exit 2


# -- 15. a terminal that cannot show the run's path ------------------------------------------------


def test_a_path_the_terminal_cannot_encode_is_escaped_and_the_log_goes_on(tmp_path):
    data = write_image_folder(tmp_path / "flowers", classes=("a", "b"), per_class=3, size=8)
    save = tmp_path / "runs-\u00e9t\u00e9-\u4e2d"
    proc = subprocess.run(
        [sys.executable, "-m", "densenet_efficient", "train", "--data", str(data), "--depth", "10",
         "--growth-rate", "4", "--batch-size", "4", "--valid-size", "2", "--image-size", "8",
         "--n-epochs", "2", "--workers", "0", "--no-progress", "--save", str(save)],
        capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "ascii:strict"},
        timeout=300,
    )  # fmt: skip
    out, err = proc.stdout.decode("ascii"), proc.stderr.decode("ascii", "replace")
    assert proc.returncode == 0, err
    assert "stdout was closed" not in err
    assert "runs-\\xe9t\\xe9-\\u4e2d" in out  # escaped, not dropped
    assert "epoch 1/2" in out and "epoch 2/2" in out  # the lines after the path are printed too


def test_check_run_folder_releases_its_lock(tmp_path):
    with check_run_folder(tmp_path / "run"):
        pass
    with check_run_folder(tmp_path / "run"):  # released: claimed again at once
        pass


def test_a_fifo_among_the_cifar_batches_is_refused_without_blocking(tmp_path, monkeypatch):
    from ..support.fakedata import point_cifar10_at, write_fake_cifar10

    point_cifar10_at(monkeypatch, write_fake_cifar10(tmp_path / "cifar", per_batch=2, test_size=2))
    batch = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3"
    batch.unlink()
    os.mkfifo(batch)
    with within(30), pytest.raises(UsageError, match=r"CIFAR10 batch .*data_batch_3: it is a FIFO"):
        build_data("cifar10", tmp_path / "cifar")
