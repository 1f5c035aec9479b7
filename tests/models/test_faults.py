"""Review round three, model folders and weights: save_pretrained killed, on a full disk and read
while it saves; integer weights; hand-written manifests; a NaN in config.json or in a conversion's
source; a Hugging Face cache that cannot take a download."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import densenet_efficient as de
from densenet_efficient.errors import UsageError
from densenet_efficient.io.download import DownloadError
from densenet_efficient.io.state_dict import StateDictMismatchError
from densenet_efficient.models import weights as W

from ..support import REPO
from ..support.disk import full_disk
from ..support.hub_server import manifest_override, randomize_


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _small(seed: int = 0, depth: int = 10, growth: int = 4) -> de.DenseNet:
    torch.manual_seed(seed)
    return randomize_(de.densenet_bc(depth, growth, num_classes=3), seed).eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# -- 2. save_pretrained is atomic ------------------------------------------------------------------

_KILLED_SAVE = textwrap.dedent(
    """
    import os, sys
    import densenet_efficient as de

    def weights_then_killed(model, folder):  # the mixin's hook, where the files are written
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        os._exit(9)  # killed before config.json is written

    de.DenseNet._save_pretrained = weights_then_killed
    de.densenet_bc(16, 12, num_classes=5).save_pretrained(sys.argv[1])
    """
)


def test_save_pretrained_killed_half_way_leaves_the_folder_loadable(tmp_path):
    out = tmp_path / "model"
    small = _small()
    small.save_pretrained(out)
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(out)], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 9
    assert _snapshot(out) == before  # not a file of it changed, none deleted
    assert _same_outputs(de.from_pretrained(out), small)
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # what the kill left...
    _small(1).save_pretrained(out)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # ...the next save removes
    # a new folder killed half-way does not appear at all
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path / "new")],
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 9 and not (tmp_path / "new").exists()


@pytest.mark.parametrize("how", ["disk", "safetensors"])
def test_save_pretrained_on_a_full_disk_keeps_the_folder_and_leaves_nothing(tmp_path, monkeypatch, how):
    root = tmp_path / "disk"
    root.mkdir()
    small, big = _small(), _small(1, depth=16, growth=12)
    if how != "disk":
        small.save_pretrained(root / "model")
    with full_disk(root, how, monkeypatch):
        if how == "disk":
            small.save_pretrained(root / "model")  # fits in the room left; the bigger one does not
        before, listing = _snapshot(root / "model"), sorted(os.listdir(root))
        with pytest.raises(OSError, match=f"No space left on device while writing {root / 'model'}"):
            big.save_pretrained(root / "model")
        assert _snapshot(root / "model") == before and sorted(os.listdir(root)) == listing
        assert _same_outputs(de.from_pretrained(root / "model"), small)
        with pytest.raises(OSError, match="nothing was written there"):
            big.save_pretrained(root / "new")
        assert sorted(os.listdir(root)) == listing


def test_a_reader_during_a_re_save_always_finds_a_loadable_folder(tmp_path):
    out = tmp_path / "model"
    model = _small()
    model.save_pretrained(out)
    done, failures = threading.Event(), []

    def save_again() -> None:
        try:
            for _ in range(15):
                model.save_pretrained(out)
        finally:
            done.set()

    writer = threading.Thread(target=save_again)
    writer.start()
    loads = 0
    while not done.is_set() or loads == 0:
        try:
            de.from_pretrained(out)
        except Exception as err:  # noqa: BLE001 (collected: the assertion below names it)
            failures.append(err)
        loads += 1
    writer.join()
    assert failures == [] and loads > 0


def test_a_fifo_where_config_json_should_be_is_refused_without_blocking(tmp_path):
    out = tmp_path / "model"
    _small().save_pretrained(out)
    (out / "config.json").unlink()
    os.mkfifo(out / "config.json")
    from ..support.timeouts import within

    with within(30), pytest.raises(UsageError, match=r"config.json: it is a FIFO \(named pipe\), expected a regular file"):
        de.from_pretrained(out)


# -- 7. integer weights --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_weights_are_refused_by_from_pretrained_as_by_convert(tmp_path, dtype):
    out = tmp_path / "model"
    _small().save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    tensors["features.denseblock1.denselayer1.conv1.weight"] = tensors[
        "features.denseblock1.denselayer1.conv1.weight"
    ].to(dtype)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(
        StateDictMismatchError, match=rf"denselayer1.conv1.weight holds {dtype} numbers, expected floating point"
    ):
        de.from_pretrained(out)
    with pytest.raises(de.ConversionError, match=rf"conv1.weight should hold floating-point numbers.*{dtype}"):
        de.convert(out / "model.safetensors", tmp_path / "converted", progress=False)
    assert not (tmp_path / "converted").exists()


def test_integer_batch_counters_are_still_fine(tmp_path):
    out = tmp_path / "model"
    model = _small()
    model.save_pretrained(out)
    assert _same_outputs(de.from_pretrained(out), model)  # num_batches_tracked is an int64 counter


# -- 16. NaN in config.json and in a conversion's source -------------------------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("drop_rate", r"drop_rate must be a number in \[0, 1\), found nan"),
        ("growth_rate", "growth_rate must be an integer >= 1, found nan"),
        ("num_classes", "num_classes must be an integer >= 0, found nan"),
    ],
)
@pytest.mark.parametrize("load", [de.from_pretrained, de.DenseNet.from_pretrained], ids=["de", "DenseNet"])
@pytest.mark.parametrize(
    "choices", [{}, {"num_classes": 3, "memory_efficient": True}], ids=["plain", "choices"]
)
def test_a_nan_in_config_json_is_blamed_on_the_file(tmp_path, field, expected, load, choices):
    """The caller's arguments are checked before huggingface_hub's mixin copies config.json's
    fields into them, so a NaN there (NaN != NaN) is never taken for the caller's choice."""
    out = tmp_path / "model"
    _small().save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config[field] = math.nan
    (out / "config.json").write_text(json.dumps(config))  # json writes NaN
    with pytest.raises(UsageError, match=rf"^{re.escape(str(out))}: config.json: {expected}$") as caught:
        load(out, **choices)
    assert "cannot change the saved architecture" not in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_a_nan_in_a_conversions_source_is_named_not_reported_as_a_bad_conversion(tmp_path):
    state = _small().state_dict()
    state["features.norm5.running_var"][0] = math.nan
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(de.ConversionError, match="the source checkpoint's tensor features.norm5.running_var holds NaN") as caught:
        de.convert(tmp_path / "nan.pth", tmp_path / "out", progress=False)
    assert "differs by" not in str(caught.value) and not (tmp_path / "out").exists()
    de.convert(tmp_path / "nan.pth", tmp_path / "out", progress=False, verify=False)  # as asked
    assert (tmp_path / "out" / "model.safetensors").is_file()


# -- 11. hand-written manifests ------------------------------------------------------------------


def _entry(**changes):
    template = W.builtin_manifest()["architectures"]["densenet121"]["weights"]["IMAGENET1K_V1"]
    return {**template, **changes}


def _manifest(architectures) -> dict:
    return {"format": W.MANIFEST_FORMAT, "architectures": architectures}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_manifest({"densenet121": "IMAGENET1K_V1"}), r"architectures.densenet121 must be an object"),
        (_manifest({"densenet121": {"weights": {"A": "http://h/densenet121-a639ec97.pth"}}}),
         r"architectures.densenet121.weights.A must be an object with 'url' and 'num_classes', found 'http"),
        (_manifest({"densenet121": {"weights": {"A": _entry(num_classes="ten")}}}),
         r"weights.A.num_classes must be an integer >= 1, found 'ten'"),
        (_manifest({"densenet121": {"weights": {"A": _entry(num_classes=10.0)}}}), r"num_classes .* found 10.0"),
        (_manifest({"densenet121": {"weights": {"A": _entry(url=5)}}}), r"weights.A.url must be a string, found 5"),
        (_manifest({"densenet121": {"weights": {"A": _entry(url="densenet121-a639ec97.pth")}}}),
         r"weights.A.url 'densenet121-a639ec97.pth' is not a valid URL"),
        (_manifest({"densenet121": {"weights": {"A": _entry(url="http://[fe80::1/densenet121-a639ec97.pth")}}}),
         r"is not a valid URL \(Invalid IPv6 URL\)"),
        (_manifest({"densenet121": {"weights": {"A": _entry(file_size=-1)}}}), r"file_size must be a positive number"),
        (_manifest({"densenet121": {"weights": {"A": _entry(file_size=1e400)}}}), r"file_size .* found inf"),
        (_manifest({"densenet121": {"weights": {"A": _entry(preprocessing={"crop_size": "224"})}}}),
         r"preprocessing.crop_size must be an integer >= 1, found '224'"),
        (_manifest({"densenet121": {"weights": {}, "default": 3}}), r"densenet121.default must be a weights name or null"),
        (_manifest({"densenet121": {"weights": {"A": _entry(categories=[1, 2])}}}), r"categories must be"),
    ],
)
def test_a_hand_written_manifest_is_checked_field_by_field(tmp_path, monkeypatch, content, message):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(content))
    monkeypatch.setenv(W.MANIFEST_ENV, str(path))
    with pytest.raises(UsageError, match=message):
        W.get_weights("densenet121")


def test_a_manifest_that_is_not_utf8_or_nested_too_deep_is_one_sentence(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    monkeypatch.setenv(W.MANIFEST_ENV, str(path))
    path.write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(UsageError, match="manifest.json is not valid JSON .*utf-8"):
        W.get_weights("densenet121")
    path.write_text('{"format": "x", "architectures": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UsageError, match="field 'architectures' is nested more than"):
        W.get_weights("densenet121")
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(UsageError, match="it is a FIFO"):
        W.get_weights("densenet121")


def test_a_manifest_default_naming_missing_weights_names_it(tmp_path, monkeypatch):
    path = manifest_override(tmp_path / "manifest.json", {"densenet121": "http://h/densenet121-a639ec97.pth"})
    data = json.loads(path.read_text())
    data["architectures"]["densenet121"]["default"] = "IMAGENET1K_V9"
    path.write_text(json.dumps(data))
    monkeypatch.setenv(W.MANIFEST_ENV, str(path))
    with pytest.raises(UsageError, match=r"the default weights of densenet121 in .*manifest.json are 'IMAGENET1K_V9'"):
        W.get_weights("densenet121")


# -- 16. a Hugging Face cache that cannot take the files --------------------------------------------


def test_a_full_hugging_face_cache_is_named(tmp_path, monkeypatch):
    import huggingface_hub

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", full)
    with pytest.raises(DownloadError, match=rf"cannot store config.json of 'org/densenet' in the Hugging Face cache \({tmp_path}\): No space left"):
        de.from_pretrained("org/densenet", cache_dir=str(tmp_path))


# -- 16 and 17. conversions: a URL source's errors, a killed conversion's staging --------------------

_KILLED_CONVERT = textwrap.dedent(
    """
    import os, sys
    import densenet_efficient.conversion.converter as converter

    def killed(*args, **kwargs):
        os._exit(9)  # during verification: the staged folder is complete and model-sized

    converter._verify_folder = killed
    converter.convert(sys.argv[1], sys.argv[2], progress=False)
    """
)


def test_a_killed_conversions_staging_is_removed_by_the_next_conversion(tmp_path):
    src = tmp_path / "src" / "bc.pth"
    src.parent.mkdir()
    torch.save(_small().state_dict(), src)
    out = tmp_path / "hub" / "model"
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", _KILLED_CONVERT, str(src), str(out)],
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 9
    left = os.listdir(out.parent)
    assert left and all(n.startswith(".") and n.endswith(".partial") for n in left), left
    assert sum(f.stat().st_size for f in out.parent.rglob("*") if f.is_file()) > 10_000  # model-sized
    de.convert(src, out, progress=False)
    assert os.listdir(out.parent) == ["model"]


def test_a_url_sources_error_names_the_url_not_a_deleted_copy(tmp_path):
    from ..support.hub_server import serve

    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "broken.pth").write_bytes(b"garbage, not a checkpoint")
    with serve(tmp_path / "served") as base, pytest.raises(UsageError, match="not a torch checkpoint") as caught:
        de.convert(f"{base}/broken.pth", tmp_path / "out", progress=False)
    message = str(caught.value)
    assert f"{base}/broken.pth (as downloaded)" in message and "partial" not in message, message
    assert os.listdir(tmp_path) == ["served"]
