"""Pretrained weights: registry data, ``weights=`` forms, hash-checked downloads, strict and fine-tune loading.

Everything is offline: a localhost server serves a checkpoint generated the way torchvision's 2017
files are, and the registry is pointed at it through ``DENSENET_EFFICIENT_WEIGHTS_MANIFEST``.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

import densenet_efficient as de
from densenet_efficient.io.state_dict import StateDictMismatchError
from densenet_efficient.models import weights as W
from densenet_efficient.models.config import MODEL_TABLE, num_params

from ..support import REPO
from ..support.archs import ALL_ARCHS, IMAGENET_ARCHS
from ..support.hub_server import legacy_checkpoint, manifest_override, serve, sha256, torchvision_from_url

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tv_file(tmp_path_factory) -> Path:
    """densenet121 in torchvision's 2017 file format (31 MB, made once per session)."""
    return legacy_checkpoint("densenet121", tmp_path_factory.getbasetemp() / "tv-files")


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """TORCH_HOME in tmp; returns a function that serves a folder and points the registry at its files."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    stack = []

    def point(folder: Path, entries: dict[str, str], cut_short: bool = False) -> Path:
        ctx = serve(folder, cut_short=cut_short)
        base = ctx.__enter__()
        stack.append(ctx)
        manifest = manifest_override(
            tmp_path / "manifest.json", {a: f"{base}/{f}" for a, f in entries.items()}
        )
        monkeypatch.setenv(W.MANIFEST_ENV, str(manifest))
        return tmp_path / "torch_home" / "hub" / "checkpoints"

    yield point
    for ctx in stack:
        ctx.__exit__(None, None, None)


# -- registry data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", IMAGENET_ARCHS)
def test_registry_matches_torchvision_metadata(arch):
    ours = de.get_weights(arch)
    tv = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    assert ours.url == tv.url and ours.name == "IMAGENET1K_V1"
    assert ours.num_classes == len(tv.meta["categories"]) == 1000
    m = ours.meta
    assert m["acc@1"] == tv.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert m["acc@5"] == tv.meta["_metrics"]["ImageNet-1K"]["acc@5"]
    with torch.device("meta"):  # a parameter count needs no memory and no initialisation
        model = de.create_model(arch)
    assert m["num_params"] == tv.meta["num_params"] == sum(p.numel() for p in model.parameters())
    assert m["GFLOPS"] == tv.meta["_ops"] and m["file_size"] == tv.meta["_file_size"]
    assert m["categories"] == tv.meta["categories"] and m["min_size"] == tv.meta["min_size"]
    assert ours.sha256_prefix == ours.filename.split("-")[1].split(".")[0] and len(ours.sha256_prefix) == 8


def test_transforms_match_torchvision():
    img = torch.randint(0, 256, (3, 300, 280), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = de.get_weights("densenet121").transforms()
    tv = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.transforms()
    out = ours(img)
    assert out.shape == (3, 224, 224) and torch.equal(out, tv(img))
    assert de.DenseNet121_Weights.DEFAULT.transforms().resize_size == [256]


def test_manifest_file_and_tables_come_from_the_model_table():
    """weights/manifest.json is the table's weights (tests/test_generated.py keeps the file current);
    the parameter counts are the configs' own."""
    data = json.loads((REPO / "weights" / "manifest.json").read_text())
    assert data == W.builtin_manifest()
    for arch, row in MODEL_TABLE.items():
        entry = data["architectures"][arch]
        assert entry["default"] == row.default_weights and list(entry["weights"]) == list(row.weights)
        for spec in entry["weights"].values():
            assert spec["num_params"] == num_params(row.config)
    assert data["architectures"]["densenet_bc_100"]["weights"] == {}
    assert data["architectures"]["densenet264"]["weights"] == {}


def test_list_and_enums():
    assert de.list_weights() == [f"{a}.IMAGENET1K_V1" for a in IMAGENET_ARCHS]
    assert de.list_weights("densenet_bc_100") == []
    assert de.DenseNet161_Weights.DEFAULT is de.DenseNet161_Weights.IMAGENET1K_V1
    assert str(de.DenseNet161_Weights.DEFAULT) == "DenseNet161_Weights.IMAGENET1K_V1"
    assert de.DenseNet169_Weights.IMAGENET1K_V1.num_classes == 1000
    assert pickle.loads(pickle.dumps(de.DenseNet201_Weights.DEFAULT)) is de.DenseNet201_Weights.IMAGENET1K_V1


def test_enum_attributes_are_plain_reads(monkeypatch):
    """A member's url, meta, num_classes and transforms are its value's, made once: reading them
    builds no manifest and reads no environment (a mirror applies where weights are loaded)."""
    member = de.DenseNet121_Weights.IMAGENET1K_V1

    def no_manifest():
        raise AssertionError("an attribute read built the manifest")

    monkeypatch.setattr(W, "manifest", no_manifest)
    monkeypatch.setattr(W, "builtin_manifest", no_manifest)
    monkeypatch.setenv(W.URL_BASE_ENV, "http://mirror.local/models")
    assert member.url == "https://download.pytorch.org/models/densenet121-a639ec97.pth"
    assert member.meta is member.meta and member.meta["acc@1"] == 74.434 and member.num_classes == 1000
    assert member.spec.url == member.url and member.transforms().crop_size == [224]
    monkeypatch.undo()
    monkeypatch.setenv(W.URL_BASE_ENV, "http://mirror.local/models")
    assert W.resolve_weights("densenet121", member, False).url == (
        "http://mirror.local/models/densenet121-a639ec97.pth"
    )


# -- weights= / pretrained= forms ---------------------------------------------------------------------


def test_every_weights_form_resolves_to_the_same_file():
    expected = de.get_weights("densenet121", "IMAGENET1K_V1")
    forms = [
        "IMAGENET1K_V1",
        "DEFAULT",
        "DenseNet121_Weights.IMAGENET1K_V1",
        "DenseNet121_Weights.DEFAULT",
        "densenet121.IMAGENET1K_V1",
        de.DenseNet121_Weights.IMAGENET1K_V1,
        de.DenseNet121_Weights.DEFAULT,
        torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,
        torchvision.models.DenseNet121_Weights.DEFAULT,
        expected,
    ]
    for form in forms:
        assert W.resolve_weights("densenet121", form, False) == expected, form
    assert W.resolve_weights("densenet121", None, True) == expected
    assert W.resolve_weights("densenet121", None, False) is None
    assert W.resolve_weights(None, None, False) is None


def test_bad_weights_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="densenet161.IMAGENET1K_V1 are for densenet161, not densenet121"):
        de.densenet121(weights=torchvision.models.DenseNet161_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match="are for densenet169, not densenet121"):
        de.densenet121(weights="DenseNet169_Weights.IMAGENET1K_V1")
    with pytest.raises(
        ValueError,
        match=r"unknown weights 'IMAGENET1K_V9' for densenet121; expected one of DEFAULT, IMAGENET1K_V1",
    ):
        de.densenet121(weights="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="are not DenseNet weights"):
        de.densenet121(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match="name no DenseNet architecture"):
        de.densenet121(weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(TypeError, match="use pretrained=True"):
        de.densenet121(weights=True)
    with pytest.raises(TypeError, match="pretrained must be True or False"):
        de.densenet121(pretrained="yes")
    with pytest.raises(TypeError, match="got int"):
        de.densenet121(weights=3)


@pytest.mark.parametrize(
    "build",
    [
        lambda: de.densenet_bc_100(pretrained=True),
        lambda: de.create_model("densenet_bc_100", weights="DEFAULT"),
        lambda: de.densenet_bc(40, pretrained=True),
    ],
)
def test_densenet_bc_has_no_weights_and_says_how_to_train(build):
    with pytest.raises(
        de.WeightsNotAvailableError, match=r"no pretrained weights are published .*densenet-efficient train"
    ):
        build()


def test_url_base_override_keeps_file_names(monkeypatch):
    monkeypatch.setenv(W.URL_BASE_ENV, "http://mirror.local/models/")
    assert de.get_weights("densenet201").url == "http://mirror.local/models/densenet201-c1103571.pth"


def test_bad_manifest_override_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv(W.MANIFEST_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        de.get_weights("densenet121")
    (tmp_path / "m.json").write_text(json.dumps({"format": "other"}))
    monkeypatch.setenv(W.MANIFEST_ENV, str(tmp_path / "m.json"))
    with pytest.raises(ValueError, match="expected a weights manifest with format"):
        de.get_weights("densenet121")
    manifest_override(tmp_path / "m.json", {"densenet121": "http://x/densenet121.pth"})
    with pytest.raises(ValueError, match="carries no sha256 prefix"):
        de.get_weights("densenet121")


# -- download and load through torch.hub ----------------------------------------------------------------


def test_generated_file_is_made_like_torchvisions_2017_files(tv_file):
    assert not zipfile.is_zipfile(tv_file)  # legacy serialization
    assert tv_file.name == f"densenet121-{sha256(tv_file)[:8]}.pth"
    sd = torch.load(tv_file, weights_only=True)
    assert "features.denseblock1.denselayer1.norm.1.weight" in sd
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    assert getattr(sd, "_metadata", None) is None


@pytest.mark.parametrize("arch", [a for a in ALL_ARCHS if a not in IMAGENET_ARCHS])
def test_a_model_without_published_weights_loads_a_served_file(arch, tmp_path, monkeypatch):
    """densenet264 and DenseNet-BC-100 (no torchvision files): a file of their own, named with its
    sha256 prefix and served from localhost through a manifest, loads with pretrained=True."""
    torch.manual_seed(0)
    saved = de.create_model(arch).state_dict()
    served = tmp_path / "served"
    served.mkdir()
    payload = served / "payload.tmp"
    torch.save(saved, payload)
    name = f"{arch}-{sha256(payload)[:8]}.pth"
    payload.rename(served / name)
    with pytest.raises(de.WeightsNotAvailableError, match=f"no pretrained weights are published for {arch}"):
        de.create_model(arch, pretrained=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with serve(served) as base:
        entry = {"url": f"{base}/{name}", "num_classes": saved["classifier.bias"].numel()}
        manifest = {
            "format": W.MANIFEST_FORMAT,
            "architectures": {arch: {"weights": {"V1": entry}, "default": "V1"}},
        }
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        monkeypatch.setenv(W.MANIFEST_ENV, str(tmp_path / "manifest.json"))
        model = de.create_model(arch, pretrained=True, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert de.list_weights(arch) == [f"{arch}.V1"] and W.weights_enum(arch) is None


def test_pretrained_equals_torchvision_on_the_same_file(tv_file, hub_env):
    cache = hub_env(tv_file.parent, {"densenet121": tv_file.name})
    ours = de.densenet121(pretrained=True, progress=False).eval()
    assert (cache / tv_file.name).is_file() and sha256(cache / tv_file.name) == sha256(tv_file)
    ref = torchvision_from_url(de.get_weights("densenet121").url)
    with torch.no_grad():
        assert torch.equal(ours(X32), ref(X32))
    for (ka, a), (kb, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b), ka


def test_load_state_dict_from_manifest_remaps_keys(tv_file, hub_env, tmp_path):
    hub_env(tv_file.parent, {"densenet121": tv_file.name})
    sd = W.load_state_dict_from_manifest("densenet121", progress=False, model_dir=tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / tv_file.name).is_file()
    assert "features.denseblock1.denselayer1.norm1.weight" in sd
    assert not any(".norm.1." in k for k in sd)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


def test_fine_tuning_loads_all_but_the_classifier_and_warns(tv_file, hub_env):
    hub_env(tv_file.parent, {"densenet121": tv_file.name})
    with pytest.warns(UserWarning, match=r"re-initialised classifier\.weight, classifier\.bias"):
        model = de.densenet121(pretrained=True, progress=False, num_classes=10)
    assert model.classifier.weight.shape == (10, 1024) and model.arch_config.num_classes == 10
    ref = W.load_state_dict_from_manifest("densenet121", progress=False)
    for k, v in model.state_dict().items():
        if not k.startswith("classifier.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(v, ref[k]), k


def test_wrong_architecture_weights_fail_strictly(tv_file, hub_env):
    hub_env(tv_file.parent, {"densenet169": tv_file.name})  # a densenet121 file registered as densenet169
    with pytest.raises(StateDictMismatchError, match=r"missing keys: features\.denseblock3\.denselayer25"):
        de.densenet169(pretrained=True, progress=False)


def _no_trusted_file(cache: Path, name: str) -> bool:
    return not (cache / name).exists() and not list(cache.glob("*.partial"))


def test_tampered_download_is_refused_and_not_cached(tv_file, hub_env, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    data = bytearray(tv_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (served / tv_file.name).write_bytes(bytes(data))
    cache = hub_env(served, {"densenet121": tv_file.name})
    with pytest.raises(W.WeightsIntegrityError, match="failed its sha256 check.*nothing was cached"):
        de.densenet121(pretrained=True, progress=False)
    assert _no_trusted_file(cache, tv_file.name)


def test_truncated_download_is_refused_and_not_cached(tv_file, hub_env, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / tv_file.name).write_bytes(tv_file.read_bytes()[: tv_file.stat().st_size // 3])
    cache = hub_env(served, {"densenet121": tv_file.name})
    with pytest.raises(W.WeightsIntegrityError, match="cut short"):
        de.densenet121(pretrained=True, progress=False)
    assert _no_trusted_file(cache, tv_file.name)


def test_dropped_connection_is_refused_and_not_cached(tv_file, hub_env):
    # urllib reports a short body as a normal end of file: only the hash check notices.
    cache = hub_env(tv_file.parent, {"densenet121": tv_file.name}, cut_short=True)
    with pytest.raises(
        W.WeightsIntegrityError, match="failed its sha256 check.*cut short.*nothing was cached"
    ):
        de.densenet121(pretrained=True, progress=False)
    assert _no_trusted_file(cache, tv_file.name)


def test_corrupted_file_already_in_the_cache_is_detected(tv_file, hub_env, tmp_path):
    cache = hub_env(tv_file.parent, {"densenet121": tv_file.name})
    cache.mkdir(parents=True)
    (cache / tv_file.name).write_bytes(tv_file.read_bytes()[:1000])  # e.g. an interrupted copy
    with pytest.warns(UserWarning, match="fail their sha256 check.*downloading it again"):
        model = de.densenet121(pretrained=True, progress=False).eval()
    assert sha256(cache / tv_file.name) == sha256(tv_file)
    expected = de.remap_keys(torch.load(tv_file, weights_only=True))
    for k, v in expected.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_corrupted_cache_with_a_bad_server_leaves_nothing(tv_file, hub_env, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / tv_file.name).write_bytes(b"not the file")
    cache = hub_env(served, {"densenet121": tv_file.name})
    cache.mkdir(parents=True)
    (cache / tv_file.name).write_bytes(b"also not the file")
    with pytest.warns(UserWarning, match="fail their sha256 check"), pytest.raises(W.WeightsIntegrityError):
        de.densenet121(pretrained=True, progress=False)
    assert _no_trusted_file(cache, tv_file.name)


class _RunsCode:
    """Unpickling this would call os.mkdir(marker): a stand-in for arbitrary code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_would_execute_code_is_refused(hub_env, tmp_path):
    marker = tmp_path / "code-was-executed"
    served = tmp_path / "served"
    served.mkdir()
    payload = served / "payload.tmp"
    torch.save({"features.conv0.weight": torch.zeros(1), "evil": _RunsCode(str(marker))}, payload)
    name = f"densenet121-{sha256(payload)[:8]}.pth"  # a correct hash: only weights_only stands in the way
    payload.rename(served / name)
    hub_env(served, {"densenet121": name})
    with pytest.raises(W.WeightsIntegrityError, match=r"weights_only=True.*nothing in it was executed"):
        de.densenet121(pretrained=True, progress=False)
    assert not marker.exists()


def test_unreachable_server_fails_clearly_and_caches_nothing(hub_env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cache = hub_env(empty, {"densenet121": "densenet121-0123abcd.pth"})  # the server answers 404
    with pytest.raises(OSError, match=r"could not download .*densenet121-0123abcd\.pth.*nothing was cached"):
        de.densenet121(pretrained=True, progress=False)
    assert _no_trusted_file(cache, "densenet121-0123abcd.pth")


def test_silent_server_for_pretrained_weights_times_out(tmp_path, monkeypatch):
    """pretrained=True against a server that accepts and never answers: a bounded wait, one clear
    OSError, nothing cached (it used to hang forever)."""
    from ..io.test_download import _server

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("DENSENET_EFFICIENT_DOWNLOAD_TIMEOUT", "0.3")
    with _server(answer_from=None) as (base, conns):
        manifest = manifest_override(tmp_path / "m.json", {"densenet121": f"{base}/densenet121-0123abcd.pth"})
        monkeypatch.setenv(W.MANIFEST_ENV, str(manifest))
        with pytest.raises(
            OSError, match=r"could not download .*no answer .* within 0\.3 s \(tried 2 times\)"
        ):
            de.densenet121(pretrained=True, progress=False)
    assert len(conns) == 2
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert not cache.exists() or os.listdir(cache) == []
