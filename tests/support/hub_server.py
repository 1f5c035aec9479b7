"""Offline stand-ins for the download servers and caches the weights/hub tests need.

* :func:`legacy_checkpoint` writes a checkpoint the way torchvision's 2017 DenseNet files are:
  old-style keys (``denselayer1.norm.1.weight``), no ``num_batches_tracked`` at all, legacy
  (non-zip) serialization, named ``<arch>-<sha256 prefix>.pth``; random weights.
* :func:`serve` runs a localhost HTTP server over a folder.
* :func:`manifest_override` writes a manifest for ``DENSENET_EFFICIENT_WEIGHTS_MANIFEST``.
* :func:`make_hf_cache` lays a folder out in a Hugging Face cache exactly as ``hf_hub_download``
  leaves it (``models--org--name/{blobs,refs/main,snapshots/<commit>/...}``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torchvision.models import _api as tv_api
from torchvision.models import densenet as tv_densenet

from densenet_efficient.models import weights as weights_mod
from densenet_efficient.models.config import get_config

from .archs import torchvision_reference

_NEW_LAYER_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and non-trivial BatchNorm statistics, so every tensor matters in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, torch.nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def legacy_checkpoint(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """A torchvision-2017-style checkpoint for ``arch`` in ``out_dir`` (reused if already there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / f"{arch}.name"
    if done.exists():
        return out_dir / done.read_text()
    torch.manual_seed(seed)
    model = randomize_(torchvision_reference(get_config(arch)), seed)
    # A fresh OrderedDict: no _metadata (version) attribute, as in the 2017 files.
    sd = OrderedDict(
        (_NEW_LAYER_KEY.sub(r"\1.\2.", k), v.clone())
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    )
    tmp = out_dir / f"{arch}.tmp"
    torch.save(sd, tmp, _use_new_zipfile_serialization=False)
    final = out_dir / f"{arch}-{sha256(tmp)[:8]}.pth"
    os.replace(tmp, final)
    done.write_text(final.name)
    return final


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


class _CutShortHandler(_QuietHandler):
    """Announces the whole file (Content-Length) but drops the connection after a third of it."""

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 3])
        self.wfile.flush()
        self.close_connection = True


@contextlib.contextmanager
def serve(directory: Path, cut_short: bool = False):
    """Serve ``directory`` on 127.0.0.1 (a free port); yields the base URL.

    ``cut_short=True`` simulates a dropped connection: every response stops after a third of the file.
    """
    handler = functools.partial(_CutShortHandler if cut_short else _QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def manifest_override(path: Path, entries: dict[str, str]) -> Path:
    """A manifest giving ``arch -> url`` for each entry (metadata copied from the built-in densenet121)."""
    template = weights_mod.builtin_manifest()["architectures"]["densenet121"]["weights"]["IMAGENET1K_V1"]
    data = {
        "format": weights_mod.MANIFEST_FORMAT,
        "architectures": {
            arch: {"default": "IMAGENET1K_V1", "weights": {"IMAGENET1K_V1": {**template, "url": url}}}
            for arch, url in entries.items()
        },
    }
    path.write_text(json.dumps(data))
    return path


def copy_checkout(dest: Path) -> Path:
    """A fresh copy of what a clone of this repository holds for torch.hub (``hubconf.py`` and the
    package, no caches), at ``dest``: a stand-in for a GitHub checkout or ``git clone``."""
    from . import REPO

    shutil.copytree(
        REPO / "densenet_efficient", dest / "densenet_efficient", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "hubconf.py", dest / "hubconf.py")
    return dest


def make_hf_cache(
    cache_dir: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef" * 2 + "01234567"
) -> Path:
    """Lay ``folder``'s files out as ``hf_hub_download`` caches repo ``repo_id`` at ``commit`` (on main)."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        # The blob name is the file's etag: sha256 for LFS files, git's blob sha1 for small ones.
        if file.suffix in (".safetensors", ".bin"):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / file.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..", "..", "blobs", etag))
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def torchvision_from_url(url: str) -> torchvision.models.DenseNet:
    """torchvision's densenet121 loaded through torchvision's own path (hash check, regex remap, strict)."""
    model = torchvision.models.densenet121()
    local = tv_api.WeightsEnum(
        "LocalDenseNet121_Weights", {"V1": tv_api.Weights(url=url, transforms=None, meta={})}
    )
    tv_densenet._load_state_dict(model, local.V1, progress=False)
    return model.eval()
