"""Checkpoint conversion: every input format, architecture inference, verification, bad inputs.

Each source file is generated here from a randomly initialised model in that exact format (key
style, serialization, wrapper dict), converted, and loaded back with ``from_pretrained``. Nothing
is downloaded: URL and registry sources are served from a localhost HTTP server.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import http.server
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

import densenet_efficient as de
from densenet_efficient import cli
from densenet_efficient.conversion import converter as convert_mod
from densenet_efficient.models.config import ARCHITECTURES, ArchConfig, densenet_bc_config

from ..support import REPO
from ..support.archs import torchvision_reference
from ..support.disk import full_disk

# Small architectures (conversion does not care about size): an ImageNet-stem one with bn_size 2
# and 7 classes, and a CIFAR DenseNet-BC-16 with k=6.
TINY = ArchConfig(growth_rate=8, block_config=(1, 2, 1, 1), num_init_features=8, bn_size=2, num_classes=7)
TINY_CIFAR = densenet_bc_config(16, growth_rate=6, num_classes=5)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics and affines, so every tensor changes the eval-mode output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, torch.nn.Linear):
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _torchvision_model(config: ArchConfig) -> torch.nn.Module:
    return _randomize(torchvision_reference(config))


def _old_torchvision_keys(sd):
    """torchvision's 2017 layout: 'norm.1'-style layer keys and no num_batches_tracked."""
    pattern = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")
    return OrderedDict(
        (pattern.sub(r"\1.\2.", k), v) for k, v in sd.items() if not k.endswith("num_batches_tracked")
    )


@pytest.fixture(autouse=True)
def _no_onednn():
    # oneDNN compiles a kernel per new convolution shape on first use, and every DenseNet layer has
    # a new input width: one-off forwards of fresh models run several times faster without it.
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


def _outputs(model, config, size=None):
    size = size or (32 if config.small_inputs else 48)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


# -- source formats ---------------------------------------------------------------------------------


def torchvision_legacy_old_keys(tmp: Path):
    model = _torchvision_model(TINY)
    path = tmp / "densenet_tiny_2017.pth"
    torch.save(_old_torchvision_keys(model.state_dict()), path, _use_new_zipfile_serialization=False)
    return path, model, TINY, "torchvision.models.DenseNet"


def torchvision_zip(tmp: Path):
    model = _torchvision_model(TINY_CIFAR)
    path = tmp / "tv.pth"
    torch.save(model.state_dict(), path)
    return path, model, TINY_CIFAR, "torchvision.models.DenseNet"


def timm_safetensors(tmp: Path):
    # timm's DenseNet uses torchvision's names (features.denseblockN.denselayerM.norm1..., classifier),
    # and timm writes model.safetensors with metadata {"format": "pt"}.
    model = _randomize(de.DenseNet(**TINY.to_kwargs()))
    path = tmp / "model.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"format": "pt"}
    )
    return path, model, TINY, "naive path"


def timm_hub_folder(tmp: Path):
    # a snapshot of a timm Hub repo (timm/densenet121.tv_in1k): config.json + model.safetensors
    path, model, config, reference = timm_safetensors(tmp)
    (tmp / "snapshot").mkdir()
    path.rename(tmp / "snapshot" / "model.safetensors")
    (tmp / "snapshot" / "config.json").write_text(
        json.dumps({"architecture": "densenet121", "num_classes": 7})
    )
    return tmp / "snapshot", model, config, reference


def timm_train_checkpoint(tmp: Path):
    # timm's train.py: {'epoch', 'arch', 'state_dict', 'optimizer', 'version', 'args', 'state_dict_ema'}
    model = _randomize(de.DenseNet(**TINY.to_kwargs()))
    ema = _randomize(de.DenseNet(**TINY.to_kwargs()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp / "checkpoint-3.pth.tar"
    torch.save(
        {
            "epoch": 3,
            "arch": "densenet121",
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "version": 2,
            "args": argparse.Namespace(lr=0.1, model="densenet121"),
            "state_dict_ema": ema.state_dict(),
        },
        path,
    )
    return path, model, TINY, "naive path"


def efficient_densenet_pytorch(tmp: Path):
    # gpleiss/efficient_densenet_pytorch models/densenet.py: CIFAR stem is conv0 alone, layers
    # named norm1/relu1/conv1/norm2/relu2/conv2 inside denseblockN.denselayerM, final norm
    # 'features.norm_final'; demo.py saves model.state_dict() of a DataParallel model ('module.').
    model = _randomize(de.DenseNet(**TINY_CIFAR.to_kwargs()))
    sd = OrderedDict(
        ("module." + k.replace("features.norm5.", "features.norm_final."), v)
        for k, v in model.state_dict().items()
    )
    path = tmp / "model.dat"
    torch.save(sd, path)
    return path, model, TINY_CIFAR, "naive path"


def wrapped_training_checkpoint(tmp: Path):
    # PyTorch-tutorial style, from a torch.compile'd model: {'epoch', 'model_state_dict', 'optimizer_state_dict', 'loss'}
    model = _randomize(de.DenseNet(**TINY_CIFAR.to_kwargs()))
    sd = OrderedDict(("_orig_mod." + k, v) for k, v in model.state_dict().items())
    path = tmp / "epoch_12.pt"
    torch.save({"epoch": 12, "model_state_dict": sd, "optimizer_state_dict": {}, "loss": 0.25}, path)
    return path, model, TINY_CIFAR, "naive path"


def lightning_checkpoint(tmp: Path):
    # PyTorch Lightning: weights under 'state_dict', prefixed by the LightningModule's attribute name
    model = _randomize(de.DenseNet(**TINY.to_kwargs()))
    sd = OrderedDict(("model." + k, v) for k, v in model.state_dict().items())
    path = tmp / "last.ckpt"
    torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.4.0", "state_dict": sd}, path)
    return path, model, TINY, "naive path"


FORMATS = [
    torchvision_legacy_old_keys,
    torchvision_zip,
    timm_safetensors,
    timm_hub_folder,
    timm_train_checkpoint,
    efficient_densenet_pytorch,
    wrapped_training_checkpoint,
    lightning_checkpoint,
]


@pytest.mark.parametrize("make", FORMATS, ids=[f.__name__ for f in FORMATS])
def test_convert_each_format(make, tmp_path):
    src, source_model, config, reference = make(tmp_path)
    out = tmp_path / "hub" / "converted"
    result = de.convert(src, out)

    assert result.config == config
    assert result.reference is not None and reference in result.reference
    assert result.max_abs_diff is not None and result.max_abs_diff <= convert_mod.TOLERANCE
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert os.listdir(out.parent) == ["converted"]  # no temp folders left beside it

    # provenance: file name, its sha256, verification result
    card = (out / "README.md").read_text()
    file = src / "model.safetensors" if src.is_dir() else src
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    assert result.sha256 == digest and digest in card and file.name in card
    assert "max abs diff" in card and "converted_at" in card

    loaded = de.from_pretrained(out)
    assert loaded.arch_config == config
    assert torch.equal(_outputs(loaded, config), _outputs(source_model, config))


def test_training_checkpoint_key_choice(tmp_path):
    src, model, config, _ = timm_train_checkpoint(tmp_path)
    default = de.convert(src, tmp_path / "live")
    assert "'state_dict'" in default.source_format
    ema = de.convert(src, tmp_path / "ema", checkpoint_key="state_dict_ema")
    assert "'state_dict_ema'" in ema.source_format
    live, averaged = de.from_pretrained(tmp_path / "live"), de.from_pretrained(tmp_path / "ema")
    assert torch.equal(_outputs(live, config), _outputs(model, config))
    assert not torch.equal(_outputs(averaged, config), _outputs(model, config))
    with pytest.raises(de.CheckpointError, match="no entry 'ema'.*state_dict_ema"):
        de.convert(src, tmp_path / "missing", checkpoint_key="ema")
    assert not (tmp_path / "missing").exists()


def test_fp16_checkpoint_is_upcast(tmp_path):
    model = _randomize(de.DenseNet(**TINY_CIFAR.to_kwargs())).half()
    torch.save(model.state_dict(), tmp_path / "half.pth")
    result = de.convert(tmp_path / "half.pth", tmp_path / "out")
    assert result.max_abs_diff <= convert_mod.TOLERANCE
    loaded = de.from_pretrained(tmp_path / "out")
    assert loaded.features.conv0.weight.dtype == torch.float32
    assert torch.equal(loaded.features.conv0.weight, model.features.conv0.weight.float())


# -- architecture inference -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_infer_registry_architectures(arch):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        sd = de.create_model(arch).state_dict()
    assert de.infer_config(sd) == ARCHITECTURES[arch]
    assert de.infer_config(_old_torchvision_keys(sd)) == ARCHITECTURES[arch]


def test_infer_nonstandard_densenet_bc():
    sd = de.densenet_bc(40, growth_rate=24).state_dict()
    assert de.infer_config(sd) == ArchConfig(24, (6, 6, 6), 48, 4, 10, small_inputs=True)
    sd = de.DenseNet(20, (3, 5), 30, bn_size=3, num_classes=4, small_inputs=False).state_dict()
    assert de.infer_config(sd) == ArchConfig(20, (3, 5), 30, 3, 4, small_inputs=False)


def test_infer_input_channels_and_headless_models():
    assert de.infer_config(de.DenseNet(**{**TINY.to_kwargs(), "in_chans": 1}).state_dict()).in_chans == 1
    headless = de.DenseNet(**{**TINY.to_kwargs(), "num_classes": 0})
    assert de.infer_config(headless.state_dict()) == TINY.with_classes(0)


def _tiny_sd():
    return de.DenseNet(**TINY.to_kwargs()).state_dict()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.update({"features.conv1.weight": torch.zeros(8, 8, 3, 3)}), "deep stem"),
        (lambda sd: sd.pop("features.norm0.weight"), "unsupported stem"),
        (
            lambda sd: sd.update({"features.transition1.conv.weight": torch.zeros(12, 16, 1, 1)}),
            "should map 16 channels to 8",
        ),
        (lambda sd: sd.pop("classifier.weight"), "no 'classifier.weight'"),
        (
            lambda sd: sd.update({"features.denseblock2.denselayer2.norm1.weight": torch.zeros(5)}),
            r"shape mismatch: features\.denseblock2\.denselayer2\.norm1\.weight \(checkpoint \(5,\), model \(16,\)\)",
        ),
        (
            lambda sd: [sd.pop(k) for k in list(sd) if ".denselayer1." in k and "denseblock2" in k],
            r"denseblock2's layers should be numbered 1\.\.1, found \[2\]",
        ),
    ],
    ids=["deep-stem", "no-norm0", "compression", "half-headless", "shape", "layer-gap"],
)
def test_infer_rejects_inconsistent_tensors(edit, message):
    sd = _tiny_sd()
    edit(sd)
    with pytest.raises(de.ConversionError, match=message):
        de.infer_config(sd)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"growth_rate": 100000},
            r"shape mismatch: .*denselayer1\.conv1\.weight \(checkpoint \(48, 24, 1, 1\), model \(400000, 24, 1, 1\)\)",
        ),
        ({"block_config": (3000, 1, 1)}, r"missing keys: features\.denseblock1\.denselayer2\."),
    ],
)
def test_config_checked_against_a_file_header_builds_nothing(fields, message, tmp_path, monkeypatch):
    """A config.json that contradicts a 90 KB weights file fails on shapes read from the file's
    header, before any model (gigabytes for these configs) is built."""
    from safetensors import safe_open

    save_file(de.densenet_bc(10).state_dict(), str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        header = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(de.DenseNet, "__init__", no_model)
    config = dataclasses.replace(densenet_bc_config(10), **fields)
    with pytest.raises(de.StateDictMismatchError, match=message):
        config.check_shapes(header)
    densenet_bc_config(10).check_shapes(header)  # the true config passes
    assert de.infer_config(load_file(str(tmp_path / "w.safetensors"))) == densenet_bc_config(10)


def test_arch_and_num_classes_must_agree(tmp_path):
    tv = _torchvision_model(ArchConfig(48, (1, 1, 1, 1), 96, num_classes=3))
    torch.save(tv.state_dict(), tmp_path / "k48.pth")
    with pytest.raises(
        de.ConversionError,
        match=r"--arch densenet121 has growth rate 32 but the checkpoint's tensors say 48; "
        r"--arch densenet121 has block config \(6, 12, 24, 16\) but the checkpoint's tensors say \(1, 1, 1, 1\); "
        r"--arch densenet121 has init features 64 but the checkpoint's tensors say 96",
    ):
        de.convert(tmp_path / "k48.pth", tmp_path / "out", arch="densenet121")
    with pytest.raises(
        de.ConversionError, match="--num-classes is 1000 but the checkpoint's classifier has 3"
    ):
        de.convert(tmp_path / "k48.pth", tmp_path / "out", num_classes=1000)
    assert sorted(os.listdir(tmp_path)) == ["k48.pth"]
    assert de.convert(tmp_path / "k48.pth", tmp_path / "out", num_classes=3).config.num_classes == 3


# -- bad inputs through the command line: one sentence, exit code 2, nothing written ----------------


def _bad_resnet(tmp: Path) -> Path:
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp / "resnet18.pth")
    return tmp / "resnet18.pth"


def _bad_truncated_zip(tmp: Path) -> Path:
    torch.save(de.DenseNet(**TINY.to_kwargs()).state_dict(), tmp / "full.pth")
    data = (tmp / "full.pth").read_bytes()
    (tmp / "cut.pth").write_bytes(data[: len(data) // 2])
    return tmp / "cut.pth"


def _bad_truncated_legacy(tmp: Path) -> Path:
    torch.save(
        de.DenseNet(**TINY.to_kwargs()).state_dict(), tmp / "full.pth", _use_new_zipfile_serialization=False
    )
    data = (tmp / "full.pth").read_bytes()
    (tmp / "cut.pth").write_bytes(data[:-100])
    return tmp / "cut.pth"


def _bad_truncated_safetensors(tmp: Path) -> Path:
    save_file(de.DenseNet(**TINY.to_kwargs()).state_dict(), str(tmp / "full.safetensors"))
    data = (tmp / "full.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    return tmp / "cut.safetensors"


def _bad_shape(tmp: Path) -> Path:
    sd = de.DenseNet(**TINY.to_kwargs()).state_dict()
    sd["features.denseblock3.denselayer1.conv2.weight"] = torch.zeros(8, 16, 1, 1)
    torch.save(sd, tmp / "shape.pth")
    return tmp / "shape.pth"


def _bad_pickled_module(tmp: Path) -> Path:
    torch.save({"model": de.DenseNet(**TINY.to_kwargs())}, tmp / "whole_model.pth")
    return tmp / "whole_model.pth"


def _bad_not_a_checkpoint(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("hello")
    return tmp / "notes.txt"


def _bad_folder_without_weights(tmp: Path) -> Path:
    (tmp / "repo").mkdir()
    (tmp / "repo" / "config.json").write_text("{}")
    return tmp / "repo"


def _bad_legacy_cut(size: int):
    """bc10 in legacy serialization cut to ``size`` bytes: inside the tensor data (was struct.error)."""

    def make(tmp: Path) -> Path:
        torch.save(de.densenet_bc(10).state_dict(), tmp / "full.pth", _use_new_zipfile_serialization=False)
        (tmp / "cut.pth").write_bytes((tmp / "full.pth").read_bytes()[:size])
        return tmp / "cut.pth"

    make.__name__ = f"_bad_legacy_cut_{size}"
    return make


def _bad_dtype(dtype: torch.dtype):
    """A safetensors file whose weights and statistics are ``dtype`` (int32, bool) instead of floats."""

    def make(tmp: Path) -> Path:
        sd = {k: v.to(dtype) for k, v in de.densenet_bc(10).state_dict().items()}
        save_file(sd, str(tmp / "weights.safetensors"))
        return tmp / "weights.safetensors"

    make.__name__ = f"_bad_dtype_{str(dtype)[6:]}"
    return make


def _bad_zero_size(key: str, shape: tuple[int, ...]):
    """A weight with a zero-size dimension (a zero growth rate was a ZeroDivisionError)."""

    def make(tmp: Path) -> Path:
        sd = de.densenet_bc(10).state_dict()
        sd[key] = torch.zeros(shape)
        torch.save(sd, tmp / "zero.pth")
        return tmp / "zero.pth"

    make.__name__ = f"_bad_zero_{key.split('.')[-2]}"
    return make


BAD = [
    *[(_bad_legacy_cut(n), "truncated or corrupt torch file") for n in (5000, 6000, 8000)],
    *[(_bad_dtype(d), rf"should hold floating-point numbers .*found {d}") for d in (torch.int32, torch.bool)],
    (
        _bad_zero_size("features.denseblock1.denselayer1.conv2.weight", (0, 48, 3, 3)),
        r"conv2\.weight has a zero-size dimension \(shape \(0, 48, 3, 3\)\)",
    ),
    (_bad_zero_size("features.conv0.weight", (0, 3, 3, 3)), r"conv0\.weight has a zero-size dimension"),
    (_bad_resnet, r"not a DenseNet checkpoint \(its layout looks like a ResNet\)"),
    (_bad_truncated_zip, "truncated or corrupt torch file"),
    (_bad_truncated_legacy, "truncated or corrupt torch file"),
    (_bad_truncated_safetensors, "truncated or corrupt safetensors file"),
    (_bad_shape, r"shape mismatch: features\.denseblock3\.denselayer1\.conv2\.weight"),
    (_bad_pickled_module, r"refusing to read .*DenseNet"),
    (_bad_not_a_checkpoint, "not a torch checkpoint"),
    (_bad_folder_without_weights, "folder without model.safetensors or pytorch_model.bin"),
]


@pytest.mark.parametrize("make, message", BAD, ids=[f.__name__[5:] for f, _ in BAD])
def test_bad_input_cli(make, message, tmp_path, capsys):
    src_dir, out_root = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_root.mkdir()
    src = make(src_dir)
    assert cli.main(["convert", str(src), str(out_root / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densenet-efficient convert: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert os.listdir(out_root) == []


@pytest.mark.parametrize("how", ["disk", "safetensors"])
def test_full_disk_cli(how, tmp_path, monkeypatch, capsys):
    """A full disk is one sentence with the OS error, not a SafetensorError traceback; nothing is left."""
    src = _bad_legacy_cut(10**9)(tmp_path)  # the whole file
    root = tmp_path / "disk"
    root.mkdir()
    with full_disk(root, how, monkeypatch):
        before = sorted(os.listdir(root))
        assert cli.main(["convert", str(src), str(root / "model"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert sorted(os.listdir(root)) == before
    assert err.startswith(
        "densenet-efficient convert: error: [Errno 28] No space left on device while writing "
    )
    assert err.endswith(f"{root / 'model'}; nothing was written there") and "\n" not in err


def test_existing_output_dir_cli(tmp_path, capsys):
    src, *_ = torchvision_zip(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli.main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and "already exists" in err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_missing_parent_folders_removed_on_failure(tmp_path):
    src = _bad_shape(tmp_path)
    with pytest.raises(de.ConversionError):
        de.convert(src, tmp_path / "a" / "b" / "model")
    assert not (tmp_path / "a").exists()


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    src, *_ = torchvision_zip(tmp_path)
    real = convert_mod._reference

    def perturbed(*args, **kwargs):
        model, name = real(*args, **kwargs)
        with torch.no_grad():
            model.classifier.bias.add_(1e-3)
        return model, name

    monkeypatch.setattr(convert_mod, "_reference", perturbed)
    (tmp_path / "out").mkdir()
    with pytest.raises(de.ConversionError, match=r"verification failed: .* differs .* by 0\.001"):
        de.convert(src, tmp_path / "out" / "model")
    assert os.listdir(tmp_path / "out") == []


def test_folder_loads_through_torch_hub_entrypoint(tmp_path):
    src, model, config, _ = efficient_densenet_pytorch(tmp_path)
    de.convert(src, tmp_path / "out")
    hub_model = torch.hub.load(
        str(REPO), "densenet_bc", source="local", depth=16, growth_rate=6, num_classes=5, trust_repo=True
    )
    hub_model.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert torch.equal(_outputs(hub_model, config), _outputs(model, config))


def test_no_verify(tmp_path):
    src, model, config, _ = efficient_densenet_pytorch(tmp_path)
    result = de.convert(src, tmp_path / "out", verify=False)
    assert result.max_abs_diff is None and "skipped" in (tmp_path / "out" / "README.md").read_text()
    assert torch.equal(_outputs(de.from_pretrained(tmp_path / "out"), config), _outputs(model, config))


def test_cli_subprocess_success_and_failure(tmp_path):
    src, model, config, _ = efficient_densenet_pytorch(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "densenet_efficient", "convert", str(src), str(tmp_path / "out"), "--quiet"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "max abs diff" in ok.stdout and "model.dat" in ok.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert torch.equal(_outputs(de.from_pretrained(tmp_path / "out"), config), _outputs(model, config))


# -- URL and registry sources, served from localhost --------------------------------------------------


@pytest.fixture
def http_root(tmp_path):
    """A localhost HTTP server over a temporary folder; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _publish(model_sd, root: Path, stem: str, legacy: bool = True) -> str:
    """Save like torchvision's hosted files: legacy serialization, old keys, named stem-<sha256[:8]>.pth."""
    tmp = root / "tmp.pth"
    torch.save(_old_torchvision_keys(model_sd), tmp, _use_new_zipfile_serialization=not legacy)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"{stem}-{digest[:8]}.pth"
    tmp.rename(root / name)
    return name


def test_url_source_with_hash_check(tmp_path, http_root):
    root, base = http_root
    model = _torchvision_model(TINY)
    name = _publish(model.state_dict(), root, "tiny")
    result = de.convert(f"{base}/{name}", tmp_path / "out", progress=False)
    assert result.source_file == name and result.sha256.startswith(name[5:13])
    assert torch.equal(_outputs(de.from_pretrained(tmp_path / "out"), TINY), _outputs(model, TINY))

    (root / "tiny-00000000.pth").write_bytes((root / name).read_bytes())  # wrong hash in the name
    with pytest.raises(de.ConversionError, match="integrity check"):
        de.convert(f"{base}/tiny-00000000.pth", tmp_path / "bad", progress=False)
    with pytest.raises(de.ConversionError, match="cannot download"):
        de.convert(f"{base}/absent.pth", tmp_path / "bad", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["out", "www"]


def _manifest(tmp: Path, base: str, files: dict[str, str]) -> Path:
    data = json.loads((REPO / "weights" / "manifest.json").read_text())
    for arch, name in files.items():
        entry = data["architectures"][arch]["weights"]["IMAGENET1K_V1"]
        entry["url"] = f"{base}/{name}"
    data["architectures"] = {a: data["architectures"][a] for a in files}
    path = tmp / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def test_all_torchvision_from_local_server(tmp_path, http_root, monkeypatch, capsys):
    root, base = http_root
    archs = ["densenet121", "densenet161", "densenet169", "densenet201"]
    assert convert_mod.torchvision_architectures() == archs
    sources = {}
    for arch in archs:  # full size: --all-torchvision checks each file is the architecture it claims
        torch.manual_seed(archs.index(arch))
        sources[arch] = torchvision.models.get_model(arch).state_dict()
    files = {arch: _publish(sd, root, arch) for arch, sd in sources.items()}
    monkeypatch.setenv("DENSENET_EFFICIENT_WEIGHTS_MANIFEST", str(_manifest(tmp_path, base, files)))
    cache, hub_root = tmp_path / "cache", tmp_path / "hub"

    # through the maintainer script, which wraps `densenet-efficient convert --all-torchvision`
    code = _script().main([str(hub_root), "--model-dir", str(cache), "--quiet"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert sorted(os.listdir(hub_root)) == archs
    for arch in archs:
        assert files[arch] in printed
        card = (hub_root / arch / "README.md").read_text()
        assert hashlib.sha256((root / files[arch]).read_bytes()).hexdigest() in card
        assert "torchvision's own loader" in card
        loaded = de.from_pretrained(hub_root / arch)
        # identical outputs follow from identical architecture and tensors (outputs are compared,
        # on small models, in test_convert_each_format; here the conversion's own check ran too)
        assert loaded.arch_config == ARCHITECTURES[arch]
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, sources[arch][key]), key
    assert printed.count("max abs diff 0 ") == 4

    # an OUT_ROOT that already holds the folders: nothing is downloaded or written
    assert cli.main(["convert", "--all-torchvision", str(hub_root), "--model-dir", str(cache)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert sorted(os.listdir(hub_root)) == archs


def _script():
    spec = importlib.util.spec_from_file_location(
        "convert_torchvision", REPO / "scripts" / "convert_torchvision.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_registry_name_source(tmp_path, http_root, monkeypatch, capsys):
    root, base = http_root
    model = _torchvision_model(TINY)
    name = _publish(model.state_dict(), root, "densenet121")
    monkeypatch.setenv(
        "DENSENET_EFFICIENT_WEIGHTS_MANIFEST", str(_manifest(tmp_path, base, {"densenet121": name}))
    )
    result = de.convert("densenet121", tmp_path / "out", model_dir=tmp_path / "cache", progress=False)
    assert result.source_file == name and (tmp_path / "cache" / name).is_file()
    assert torch.equal(_outputs(de.from_pretrained(tmp_path / "out"), TINY), _outputs(model, TINY))
    # the registry entry names densenet121; --arch says what the tensors must be
    with pytest.raises(
        de.ConversionError, match="--arch densenet121 has growth rate 32 but the checkpoint's tensors say 8"
    ):
        de.convert("densenet121", tmp_path / "checked", arch="densenet121", model_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="densenet_bc_100"):
        de.convert("densenet_bc_100", tmp_path / "none", model_dir=tmp_path / "cache")
    # the maintainer script checks each file is the architecture it is published as
    code = _script().main([str(tmp_path / "script"), "densenet121", "--model-dir", str(tmp_path / "cache")])
    assert code == 2 and "growth rate 32 but the checkpoint's tensors say 8" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["cache", "manifest.json", "out", "www"]


def test_silent_server_cli(tmp_path, monkeypatch, capsys):
    """A server that accepts and never answers: two short timeouts, one sentence, nothing written."""
    from ..io.test_download import _server

    monkeypatch.setenv("DENSENET_EFFICIENT_DOWNLOAD_TIMEOUT", "0.3")
    with _server(answer_from=None) as (base, conns):
        assert cli.main(["convert", f"{base}/tiny-0123abcd.pth", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"densenet-efficient convert: error: .*no answer from .* within 0\.3 s \(tried 2 times\).*", err
    )
    assert len(conns) == 2 and os.listdir(tmp_path) == []
