"""Hugging Face Hub folders: atomic writes, strict round trips, offline cache, timm repos, model cards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants

import densenet_efficient as de
from densenet_efficient.io.state_dict import StateDictMismatchError
from densenet_efficient.models import hub

from ..support import REPO
from ..support.archs import torchvision_reference
from ..support.hub_server import legacy_checkpoint, make_hf_cache, randomize_

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def tiny(num_classes: int = 7) -> de.DenseNet:
    """A small ImageNet-stem DenseNet with random weights and BN statistics."""
    return randomize_(
        de.DenseNet(growth_rate=8, block_config=(1, 2, 1, 1), num_init_features=8, num_classes=num_classes)
    )


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this process (huggingface_hub reads the variable once, at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# -- writing ---------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_three_files(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    pretrained_cfg = config.pop("pretrained_cfg")
    assert config == {
        # timm's fields (timm.create_model("local-dir:...") reads them)
        "architecture": "densenet",
        "num_features": 18,
        "global_pool": "avg",
        # this package's
        "growth_rate": 8,
        "block_config": [1, 2, 1, 1],
        "num_init_features": 8,
        "bn_size": 4,
        "num_classes": 7,
        "small_inputs": False,
        "in_chans": 3,
        "drop_rate": 0.0,
    }
    assert pretrained_cfg["num_classes"] == 7 and pretrained_cfg["input_size"] == [3, 224, 224]
    assert pretrained_cfg["first_conv"] == "features.conv0" and pretrained_cfg["classifier"] == "classifier"
    assert "memory_efficient" not in config
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "densenet_efficient"
    assert card.data.license == "mit" and card.data.pipeline_tag == "image-classification"
    assert {"densenet", "memory-efficient", "image-classification"} <= set(card.data.tags)
    assert 'de.from_pretrained("<repo id or local folder>", memory_efficient=True)' in card.text
    assert "## Provenance" not in card.text


def test_registry_architectures_are_named_in_config(tmp_path):
    model = de.densenet_bc(16)
    assert hub.hub_config(model)["architecture"] == "densenet"
    assert hub.hub_config(de.densenet_bc_100(num_classes=100))["architecture"] == "densenet_bc_100"


def test_save_hub_folder_provenance_and_repo_id(tmp_path):
    prov = {
        "source": "densenet121-a639ec97.pth",
        "sha256": "a639ec97" + "0" * 56,
        "verification": {"max_abs_diff": 0.0},
    }
    out = de.save_hub_folder(
        tiny(), tmp_path / "p", provenance=prov, repo_id="org/tiny", license="bsd-3-clause"
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "bsd-3-clause"
    assert "## Provenance" in card.text and "densenet121-a639ec97.pth" in card.text
    assert '"max_abs_diff": 0.0' in card.text
    assert 'de.from_pretrained("org/tiny"' in card.text


def test_existing_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "m"
    tiny().save_pretrained(out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass overwrite=True"):
        de.save_hub_folder(tiny(3), out)
    assert (out / "model.safetensors").read_bytes() == before
    de.save_hub_folder(tiny(3), out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["num_classes"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or backup folders left
    (tmp_path / "empty").mkdir()
    de.save_hub_folder(tiny(), tmp_path / "empty")  # an empty folder (e.g. mkdtemp) is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        de.save_hub_folder(tiny(), tmp_path / "file", overwrite=True)


def test_failed_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(de.DenseNet, "generate_model_card", broken)  # after model.safetensors is written
    with pytest.raises(OSError, match="disk full"):
        de.save_hub_folder(tiny(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_save_hub_folder_rejects_other_models(tmp_path):
    with pytest.raises(TypeError, match="expects a densenet_efficient.DenseNet, got Linear"):
        de.save_hub_folder(torch.nn.Linear(2, 2), tmp_path / "m")
    with pytest.raises(ValueError, match="take no config"):
        tiny().save_pretrained(tmp_path / "n", config={"a": 1})
    assert not (tmp_path / "n").exists()  # refused before anything was written


# -- round trips -------------------------------------------------------------------------------------


def test_round_trip_from_folder_is_exact(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    for loaded in (de.from_pretrained(tmp_path / "m"), de.DenseNet.from_pretrained(str(tmp_path / "m"))):
        assert not loaded.training
        assert torch.equal(outputs(loaded), outputs(model))
        for (ka, a), (kb, b) in zip(loaded.state_dict().items(), model.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(a, b), ka
    assert de.from_pretrained(tmp_path / "m", memory_efficient="max_saving").memory_efficient == "max_saving"
    assert de.from_pretrained(tmp_path / "m", memory_efficient=True).memory_efficient == "efficient"


def test_round_trip_cifar_model(tmp_path):
    model = randomize_(de.densenet_bc(16, growth_rate=6, drop_rate=0.1))
    model.save_pretrained(tmp_path / "bc")
    loaded = de.from_pretrained(tmp_path / "bc")
    assert loaded.arch_config == model.arch_config and loaded.drop_rate == 0.1
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_round_trip_through_offline_hf_cache(tmp_path, offline):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    make_hf_cache(tmp_path / "hf", "org/tiny-densenet", tmp_path / "m")
    loaded = de.from_pretrained("org/tiny-densenet", cache_dir=tmp_path / "hf")
    assert torch.equal(outputs(loaded), outputs(model))


def test_a_load_fetches_each_file_once(tmp_path, offline, monkeypatch):
    """config.json and the weights are located once per load, by this package or by the mixin."""
    import huggingface_hub
    from huggingface_hub import hub_mixin

    model = tiny()
    model.save_pretrained(tmp_path / "m")
    make_hf_cache(tmp_path / "hf", "org/tiny-densenet", tmp_path / "m")
    fetched = []
    real = huggingface_hub.hf_hub_download

    def counting(repo_id, filename, **kwargs):
        fetched.append(filename)
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", counting)
    monkeypatch.setattr(hub_mixin, "hf_hub_download", counting)
    loaded = de.from_pretrained("org/tiny-densenet", cache_dir=tmp_path / "hf")
    assert torch.equal(outputs(loaded), outputs(model))
    assert sorted(fetched) == ["config.json", "model.safetensors"]


def test_missing_repo_offline_fails_with_one_sentence(tmp_path, offline):
    with pytest.raises(FileNotFoundError) as err:
        de.from_pretrained("org/not-cached", cache_dir=tmp_path / "hf")
    msg = str(err.value)
    assert "'org/not-cached'" in msg and "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "\n" not in msg


def test_hf_hub_offline_env_in_a_fresh_process(tmp_path):
    """The real HF_HUB_OFFLINE=1 path (read at import) in a fresh interpreter."""
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    make_hf_cache(tmp_path / "hf", "org/tiny-densenet", tmp_path / "m")
    torch.save(X, tmp_path / "x.pt")
    script = f"""
import torch, densenet_efficient as de
torch.set_num_threads({torch.get_num_threads()})  # same reduction order as this process
x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
with torch.no_grad():
    torch.save(de.from_pretrained("org/tiny-densenet")(x), {str(tmp_path / "y.pt")!r})
try:
    de.from_pretrained("org/missing")
except FileNotFoundError as e:
    print("ERROR:", e)
"""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), outputs(model))
    assert (
        "ERROR: cannot load 'org/missing'" in run.stdout
        and "HF_HUB_OFFLINE=1 forbids downloading it" in run.stdout
    )


# -- strictness --------------------------------------------------------------------------------------


def test_wrong_architecture_fails_naming_the_mismatch(tmp_path):
    tiny().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["growth_rate"] = 10
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(StateDictMismatchError) as err:
        de.from_pretrained(tmp_path / "m")
    msg = str(err.value)
    assert "model.safetensors does not match its config.json" in msg
    assert (
        "shape mismatch: features.denseblock1.denselayer1.conv1.weight (checkpoint (32, 8, 1, 1), model (40, 8, 1, 1))"
        in msg
    )

    config["growth_rate"], config["block_config"] = 8, [1, 1, 1, 1]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        StateDictMismatchError, match=r"unexpected keys: features\.denseblock2\.denselayer2\."
    ):
        de.from_pretrained(tmp_path / "m")


def test_other_num_classes_fine_tunes_with_a_warning(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    with pytest.warns(
        UserWarning,
        match=r"has 7 classes and the model 3.*re-initialised classifier\.weight, classifier\.bias",
    ):
        loaded = de.from_pretrained(tmp_path / "m", num_classes=3)
    assert loaded.classifier.out_features == 3
    assert torch.equal(loaded.features.norm5.running_var, model.features.norm5.running_var)


def test_unusable_folders_are_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match="has no config.json; expected a folder written by save_pretrained"
    ):
        de.from_pretrained(tmp_path / "empty")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"hidden_size": 3}))
    (tmp_path / "cfg" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="has neither DenseNet fields"):
        de.from_pretrained(tmp_path / "cfg")
    with pytest.raises(
        FileNotFoundError, match="neither an existing local folder nor a valid Hugging Face repo id"
    ):
        de.from_pretrained(str(tmp_path / "does" / "not" / "exist"))


@pytest.fixture
def hub_calls(monkeypatch):
    """Record every Hub request of a load: the ``repo_exists`` probe and each ``hf_hub_download``
    (which answers as an unreachable Hub would, at once instead of after its retries)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls: dict[str, list[str]] = {"probe": [], "download": []}
    probe: dict[str, object] = {"answer": ConnectionError("[Errno -2] Name or service not known")}

    def repo_exists(self, repo_id, **kwargs):
        calls["probe"].append(repo_id)
        if isinstance(probe["answer"], Exception):
            raise probe["answer"]
        return probe["answer"]

    def download(repo_id, filename, **kwargs):
        calls["download"].append(repo_id)
        raise LocalEntryNotFoundError("unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_exists", repo_exists)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls, probe


@pytest.mark.parametrize("typo", ["my-densnet", "runs/bset"])
def test_a_mistyped_folder_fails_at_once_when_the_hub_is_unreachable(typo, tmp_path, monkeypatch, hub_calls):
    """A name that may be a folder here ("my-densnet"; "runs/bset" next to ./runs) is not retried
    against an unreachable Hub (huggingface_hub's five retries took ~23 s): one probe, one sentence."""
    calls, _ = hub_calls
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        de.from_pretrained(typo, cache_dir=tmp_path / "hf")
    assert str(err.value) == (
        f"no folder {typo!r} in {tmp_path}, and the Hugging Face Hub could not be reached to look it up "
        "as a repo id ([Errno -2] Name or service not known)"
    )
    assert calls == {"probe": [typo], "download": []}


def test_a_mistyped_folder_that_is_no_repo_says_both(tmp_path, monkeypatch, hub_calls):
    calls, probe = hub_calls
    probe["answer"] = False
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^no folder 'my-densnet' in .*, and no Hugging Face repo"):
        de.from_pretrained("my-densnet", cache_dir=tmp_path / "hf")
    assert calls["download"] == []


def test_a_repo_id_that_cannot_be_a_folder_here_goes_to_the_hub_unprobed(tmp_path, monkeypatch, hub_calls):
    """ "timm/densenet121.tv_in1k" with no ./timm folder is a repo id: huggingface_hub's own handling."""
    calls, _ = hub_calls
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        de.from_pretrained("timm/densenet121.tv_in1k", cache_dir=tmp_path / "hf")
    assert calls == {"probe": [], "download": ["timm/densenet121.tv_in1k"]}


def test_a_cached_repo_without_namespace_loads_unprobed(tmp_path, monkeypatch, hub_calls):
    calls, _ = hub_calls
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    make_hf_cache(tmp_path / "hf", "tiny-densenet", tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(  # the cached snapshot, as hf_hub_download returns it when the Hub is unreachable
        "huggingface_hub.hf_hub_download",
        lambda repo_id, filename, cache_dir, **kw: huggingface_hub_cached(repo_id, filename, cache_dir),
    )
    assert torch.equal(
        outputs(de.from_pretrained("tiny-densenet", cache_dir=tmp_path / "hf")), outputs(model)
    )
    assert calls["probe"] == []


def huggingface_hub_cached(repo_id: str, filename: str, cache_dir: Path) -> str:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    assert isinstance(path, str), (repo_id, filename)
    return path


# -- timm repos --------------------------------------------------------------------------------------

TIMM_CONFIG = {
    "architecture": "densenet121",
    "num_classes": 1000,
    "num_features": 1024,
    "global_pool": "avg",
    "pretrained_cfg": {
        "tag": "tv_in1k",
        "custom_load": False,
        "input_size": [3, 224, 224],
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": 1000,
        "pool_size": [7, 7],
        "first_conv": "features.conv0",
        "classifier": "classifier",
    },
}


@pytest.fixture(scope="module")
def timm_repo(tmp_path_factory):
    """A local copy of timm/densenet121.tv_in1k's file layout: timm's config.json and a model.safetensors
    with timm's keys. timm's DenseNet names its modules as torchvision does (norm layers are
    BatchNormAct2d, a BatchNorm2d subclass, so they carry the same 5 tensors, num_batches_tracked
    included), and timm converts the 2017 files with the same key regex."""
    from safetensors.torch import save_file

    src = legacy_checkpoint("densenet121", tmp_path_factory.getbasetemp() / "tv-files")
    ref = torchvision_reference(de.get_config("densenet121"))
    ref.load_state_dict(de.remap_keys(torch.load(src, weights_only=True)))  # BN adds num_batches_tracked
    folder = tmp_path_factory.mktemp("timm") / "densenet121.tv_in1k"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TIMM_CONFIG, indent=2))
    (folder / "README.md").write_text("---\nlibrary_name: timm\nlicense: apache-2.0\n---\n")
    return folder, outputs(ref)


def test_timm_repo_folder_loads_and_matches_torchvision(timm_repo):
    folder, expected = timm_repo
    model = de.from_pretrained(folder)
    assert model.arch_config == de.get_config("densenet121")
    assert torch.equal(outputs(model), expected)


def test_timm_repo_from_offline_hf_cache(timm_repo, tmp_path, offline):
    folder, expected = timm_repo
    make_hf_cache(tmp_path / "hf", "timm/densenet121.tv_in1k", folder)
    model = de.DenseNet.from_pretrained(
        "timm/densenet121.tv_in1k", cache_dir=tmp_path / "hf", memory_efficient=True
    )
    assert model.memory_efficient == "efficient"
    model.set_memory_efficient(False)
    assert torch.equal(outputs(model), expected)


def test_unsupported_timm_variants_are_explained(tmp_path):
    for arch, extra, pattern in [
        (
            "densenetblur121d",
            {},
            "timm architecture 'densenetblur121d' is not supported; expected one of densenet121",
        ),
        (
            "densenet121",
            {"model_args": {"in_chans": 1}},
            r"timm options \{'in_chans': 1\} have no equivalent",
        ),
        ("densenet121", {"global_pool": "max"}, r"timm options \{'global_pool': 'max'\}"),
    ]:
        folder = tmp_path / arch
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**TIMM_CONFIG, "architecture": arch, **extra}))
        (folder / "model.safetensors").write_bytes(b"")
        with pytest.raises(ValueError, match=pattern):
            de.from_pretrained(folder)


# -- push_to_hub (offline: the upload is intercepted) -----------------------------------------------------


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        class Url:
            pass

        url = Url()
        url.repo_id = repo_id
        return url

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploaded.update({p.name: p.read_bytes() for p in folder.iterdir()})
        uploaded["repo_id"] = repo_id
        return "https://huggingface.co/org/tiny/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert tiny().push_to_hub("org/tiny") == "https://huggingface.co/org/tiny/commit/0"
    assert uploaded["repo_id"] == "org/tiny"
    assert set(uploaded) == {"repo_id", "README.md", "config.json", "model.safetensors"}
    assert b'de.from_pretrained("org/tiny", memory_efficient=True)' in uploaded["README.md"]
    assert b"memory_efficient" not in uploaded["config.json"]


# -- hostile folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors: the file is empty"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 20), "not a torch checkpoint"),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]),
            "model.safetensors: truncated or corrupt safetensors file",
        ),
        (lambda d: _edit_config(d, block_config=3), "block_config must be a list of ints, found 3"),
        (lambda d: _edit_config(d, drop_rate=None), "drop_rate must be a number in \\[0, 1\\), found None"),
        (lambda d: _edit_config(d, growth_rate=100000), "does not match its config.json"),
        (lambda d: _edit_config(d, block_config=[3000, 1, 1]), "does not match its config.json"),
        (lambda d: (d / "config.json").write_text("[1]"), "config.json must hold a JSON object"),
        (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
    ],
    ids=[
        "empty",
        "garbage",
        "truncated",
        "block-int",
        "drop-null",
        "huge-growth",
        "huge-block",
        "list",
        "json",
    ],
)
def test_hostile_folders_fail_in_one_sentence_naming_the_file(tmp_path, damage, message):
    folder = tmp_path / "m"
    de.densenet_bc(10).save_pretrained(folder)
    damage(folder)
    with pytest.raises((ValueError, StateDictMismatchError), match=message):
        de.from_pretrained(folder)


def test_timm_model_args_that_are_not_an_object_are_refused(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TIMM_CONFIG, "model_args": [1]}))
    tiny().save_pretrained(tmp_path / "w")
    (folder / "model.safetensors").write_bytes((tmp_path / "w" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="timm's model_args must be a JSON object, found \\[1\\]"):
        de.from_pretrained(folder)


def test_overwrite_replaces_only_our_files(tmp_path):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "train.py").write_text("print('mine')")
    tiny().save_pretrained(out, overwrite=True)  # the keyword older code passes still works
    de.save_hub_folder(tiny(3), out, overwrite=True)
    assert (out / "train.py").read_text() == "print('mine')"
    assert json.loads((out / "config.json").read_text())["num_classes"] == 3


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# -- one way to write a folder ----------------------------------------------------------------------


def test_both_writers_replace_a_card_this_package_wrote_and_keep_anyone_elses(tmp_path):
    """save_pretrained and save_hub_folder write through one path: this package's card describes
    the files beside it and is rewritten with them; a person's README.md is never replaced."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for write in (
        lambda model, out: model.save_pretrained(out),
        lambda model, out: de.save_hub_folder(model, out, overwrite=True),
    ):
        tiny(7).save_pretrained(ours)
        write(tiny(3), ours)
        assert "3 classes" in (ours / "README.md").read_text()  # not the stale card of the 7-class model
        theirs.mkdir(exist_ok=True)
        (theirs / "README.md").write_text("my own card")
        write(tiny(3), theirs)
        assert (theirs / "README.md").read_text() == "my own card"
        assert json.loads((theirs / "config.json").read_text())["num_classes"] == 3


def test_save_pretrained_takes_overwrite_false_as_save_hub_folder_does(tmp_path):
    out = tmp_path / "m"
    tiny().save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass overwrite=True"):
        tiny(3).save_pretrained(out, overwrite=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_readme_that_is_a_fifo_is_kept_and_never_read(tmp_path):
    import os

    out = tmp_path / "m"
    out.mkdir()
    os.mkfifo(out / "README.md")  # reading it would block forever
    tiny().save_pretrained(out)
    assert (out / "README.md").is_fifo() and (out / "model.safetensors").is_file()


def test_architecture_arguments_are_refused_before_any_file_is_looked_for(tmp_path, monkeypatch):
    """The caller's own arguments are checked before the mixin fills the rest from config.json,
    so a value in the file (a NaN included) is never mistaken for the caller's."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a file was fetched")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(
        ValueError, match=r"org/x: from_pretrained cannot change the saved architecture \(bn_size=2\)"
    ):
        de.DenseNet.from_pretrained("org/x", bn_size=2)
    with pytest.raises(
        ValueError, match=r"org/x: from_pretrained has no argument colour; it accepts memory_efficient"
    ):
        de.DenseNet.from_pretrained("org/x", colour="red")  # not handed on to the hook unread
    tiny().save_pretrained(tmp_path / "m")
    loaded = de.DenseNet.from_pretrained(tmp_path / "m", num_classes=7, memory_efficient="max_saving")
    assert loaded.num_classes == 7 and loaded.memory_efficient == "max_saving"
