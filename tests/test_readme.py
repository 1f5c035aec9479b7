"""Every ```python and ```bash block of the README is exercised by this module, none ignored.

:data:`BLOCKS` names each block (its section and position there) and how it is exercised; a block
the list does not know, or an entry with no block, fails :func:`test_every_block_is_known`.

* python blocks run with ``exec`` against offline stand-ins: torchvision's weights are a generated
  legacy-format file served from localhost (``manifest_override``); the GitHub repository is a copy
  of this checkout in torch.hub's cache (``copy_checkout``), with GitHub unreachable as offline;
  ``"path/to/checkout"`` is replaced by such a copy; ``push_to_hub`` uploads to a recorder.
  The one exception, "Use it with ...", drives long exports and compiles: each name it calls is
  resolved here, and ``tests/models/test_ecosystem.py`` runs them.
* bash blocks run command by command: ``densenet-efficient`` command lines (also under ``torchrun``)
  go through the CLI's own parser, and ``plan`` runs (it simulates the step); ``python examples/X.py``
  lines go through the example's parser (``tests/test_examples.py`` runs each example end to end);
  ``pip install`` lines name extras that setup.cfg declares (or PyTorch's CPU wheel index); the
  pytest line names real paths and plugins. Training, conversion downloads and benchmarks would
  take minutes to hours: parsed only.

Beyond the blocks: each block that needs an optional extra names it (and a command that needs one
refuses without it, naming it), every torch.hub load from GitHub passes ``trust_repo=True`` (else
torch.hub prompts), a folder is saved by a block before a later one loads it, and every link is
absolute (the README is also the package index's page) and points at a file and heading this
checkout has.
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import re
import runpy
import shlex
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import densenet_efficient as de
from densenet_efficient import cli
from densenet_efficient.errors import EXTRAS
from densenet_efficient.models import weights as W
from densenet_efficient.models.hub import HUB_REPO

from .support import REPO
from .support.hub_server import copy_checkout, legacy_checkpoint, manifest_override, serve

README = REPO / "README.md"


def readme_blocks() -> dict[tuple[str, int], tuple[str, str]]:
    """``(section heading, index within it) -> (language, code)`` for every python/bash block."""
    blocks: dict[tuple[str, int], tuple[str, str]] = {}
    section, counts = "", {}
    for match in re.finditer(
        r"^(#{1,3}) ([^\n]+)$|^```(\w*)\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S
    ):
        if match.group(2):
            section = match.group(2).strip()
        elif match.group(3) in ("python", "bash"):
            counts[section] = counts.get(section, -1) + 1
            blocks[(section, counts[section])] = (match.group(3), match.group(4))
    return blocks


# ---- bash ------------------------------------------------------------------------------------


def _commands(code: str) -> list[list[str]]:
    """Each command of a bash block as argv (comments dropped, ``&&`` chains split)."""
    commands = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1 :]
    return commands


def _check_command(argv: list[str]) -> None:
    """Exercise one README command line as the module docstring says; an unknown kind fails."""
    if argv[0] == "torchrun":  # torchrun OPTIONS -m densenet_efficient ARGS
        argv = ["densenet-efficient", *argv[argv.index("densenet_efficient") + 1 :]]
    if argv[0] == "densenet-efficient":
        args = argv[1:]
        parser, chosen = cli._parser(args)
        parser.parse_args(args)  # exits (failing the test) on an unknown option or bad value
        if chosen == "plan":
            assert cli.main(args) == 0
    elif argv[:2] == ["pip", "install"] and "--index-url" in argv:  # PyTorch's CPU wheels, nothing else
        assert argv[argv.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu", argv
        assert [a for a in argv[2:] if not a.startswith("-") and "://" not in a] == ["torch", "torchvision"]
    elif argv[:2] == ["pip", "install"]:
        target = argv[argv.index("-e") + 1]
        extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target)
        assert extras, target
        declared = configparser.ConfigParser()
        declared.read(REPO / "setup.cfg")
        for extra in (extras.group(1) or "").split(",") if extras.group(1) else []:
            assert extra in declared["options.extras_require"], target
    elif argv[:3] == ["python", "-m", "pytest"]:
        assert "-n" not in argv or importlib.util.find_spec("xdist") is not None
        assert all((REPO / a).exists() for a in argv[3:] if not a.startswith("-") and not a.isdigit())
    elif argv[0] == "python" and argv[1].startswith("examples/"):
        runpy.run_path(str(REPO / argv[1]))["parse_args"](argv[2:])  # exits on a bad option
    else:
        raise AssertionError(f"the README runs {shlex.join(argv)!r}, a command this test does not know")


def check_bash(code: str, **_: object) -> None:
    commands = _commands(code)
    assert commands
    for argv in commands:
        _check_command(argv)


# ---- python ----------------------------------------------------------------------------------


def run_use(code: str, **_: object) -> None:
    """The usage example runs as written and shows what its comments say."""
    scope: dict = {}
    exec(compile(code, "README.md#use", "exec"), scope)
    assert sum(p.numel() for p in scope["model"].parameters()) == 769_162  # the comment's figure
    assert scope["logits"].shape == (8, 10)
    assert scope["feats"].shape == (1, 1024, 7, 7)  # the comment's shape
    assert scope["deep"].arch_config.block_config == (41, 41, 41)  # depth 250 = 6 * 41 + 4
    assert scope["imagenet"].classifier.out_features == 5
    assert scope["imagenet"].memory_efficient == "max_saving"
    assert scope["model"].memory_efficient == "efficient"


def run_native(code: str, capsys, **_: object) -> None:
    """The engine-status example prints which engine runs, in the form its comment shows."""
    exec(compile(code, "README.md#the-native-engine", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed == str(de.engine_status())
    assert printed.startswith(("native engine (C++ loops from ", "python engine ("))


def run_sync(code: str, tmp_path: Path, **_: object) -> None:
    """The synchronised batch norm example, in a one-process gloo group (what torchrun would set up)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        scope: dict = {"torch": torch, "de": de}
        exec(compile(code, "README.md#synchronised-batch-norm", "exec"), scope)
    finally:
        dist.destroy_process_group()
    model = scope["model"]
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    assert isinstance(model.module.features.norm0, de.SyncBatchNorm2d)
    assert model.module.memory_efficient == "efficient"


def run_dial(code: str, capsys, **_: object) -> None:
    """The dial example runs and prints what its comments say."""
    scope: dict = {}
    exec(compile(code, "README.md#the-memory-dial", "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    comments = [line.split("  # ")[1] for line in code.splitlines() if "  # " in line and "print(" in line]
    assert printed[:2] == comments  # the two prints show what their comments say
    plan = scope["plan"]
    assert printed[0] == str(plan) and scope["model"].memory_plan == plan
    assert plan.estimated_peak <= de.parse_memory("1.5GiB")
    assert "max_saving mode (1.34 GiB); the largest batch that fits 1 GiB is 32" in printed[2]


def resolve_ecosystem_calls(code: str, **_: object) -> None:
    """Every function the block calls exists (``model.X`` on the DenseNet class); running them is
    ``tests/models/test_ecosystem.py``'s job (exports and compiles of densenet121 take minutes)."""
    import timm
    import torchvision

    roots = {"torch": torch, "de": de, "model": de.DenseNet, "timm": timm, "torchvision": torchvision}
    calls = [n.func for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)]
    dotted = [
        ast.unparse(f)
        for f in calls
        if isinstance(f, ast.Attribute) and re.fullmatch(r"[\w.]+", ast.unparse(f))
    ]
    assert len(dotted) >= 15, dotted
    for name in dotted:
        obj = roots[name.split(".")[0]]
        for part in name.split(".")[1:]:
            obj = getattr(obj, part)  # AttributeError names what the README calls in vain
    assert "create_feature_extractor" in code and "torchvision.models.feature_extraction" in code


def run_pretrained(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **_: object) -> None:
    """The weights/hub/HF block, offline: served weights, this repo in torch.hub's cache, a recorder
    standing in for the Hub upload."""
    from huggingface_hub import HfApi

    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for ref in ("main", "v0.1.0"):  # what torch.hub.load("<org>/<name>[:ref]") downloads and caches
        copy_checkout(torch_home / "hub" / f"{HUB_REPO.replace('/', '_')}_{ref}")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")  # torch.hub then picks the cached main checkout

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    uploads = []
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: type("Url", (), {"repo_id": repo_id})
    )
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, *, repo_id, folder_path, **kw: uploads.append(repo_id)
    )
    monkeypatch.chdir(tmp_path)
    code = code.replace('"path/to/checkout"', repr(str(copy_checkout(tmp_path / "checkout"))))
    tv_file = legacy_checkpoint("densenet121", tmp_path / "tv-files")
    scope: dict = {"torch": torch, "de": de}
    with serve(tv_file.parent) as base:
        manifest = manifest_override(tmp_path / "manifest.json", {"densenet121": f"{base}/{tv_file.name}"})
        monkeypatch.setenv(W.MANIFEST_ENV, str(manifest))
        with pytest.warns(UserWarning, match="re-initialised classifier"):  # the comment's "(warns)"
            exec(compile(code, "README.md#pretrained", "exec"), scope)
    assert scope["preprocess"].crop_size == [224] and scope["preprocess"].resize_size == [256]
    assert (tmp_path / "my-densenet" / "model.safetensors").is_file()
    assert 'torch.hub.load("path/to/checkout", "from_pretrained", "my-densenet"' not in code  # replaced
    assert scope["model"].memory_efficient == "efficient" and uploads == ["me/my-densenet"]


#: Each README block and how it is exercised (see the module docstring).
BLOCKS: dict[tuple[str, int], Callable[..., None]] = {
    ("densenet_efficient", 0): check_bash,  # quick start: pip, densenet-efficient train, pytest
    ("Three journeys", 0): check_bash,  # hub_predict.py (run by tests/test_examples.py)
    ("Three journeys", 1): check_bash,  # finetune.py
    ("Three journeys", 2): check_bash,  # train --save + convert_torchvision.py
    ("Install", 0): check_bash,
    ("Install", 1): check_bash,  # CPU-only: PyTorch's CPU wheels, then the package
    ("Use", 0): run_use,
    ("The native engine", 0): run_native,
    ("Synchronised batch norm, on any backend", 0): run_sync,
    ("The memory dial: any budget, not just three modes", 0): run_dial,
    ("Use it with ...", 0): resolve_ecosystem_calls,
    ("Pretrained weights, torch.hub, Hugging Face Hub", 0): run_pretrained,
    ("Training (the main job)", 0): check_bash,
    ("Training to a memory budget", 0): check_bash,  # run by tests/training/test_budget.py's configs
    ("Converting checkpoints", 0): check_bash,
    ("Benchmark and memory planner", 0): check_bash,
}


def test_every_block_is_known():
    blocks = readme_blocks()
    assert set(blocks) - set(BLOCKS) == set(), "README blocks this test does not exercise; add them to BLOCKS"
    assert set(BLOCKS) - set(blocks) == set(), "BLOCKS entries with no README block; remove them"


@pytest.mark.parametrize("key", sorted(BLOCKS), ids=lambda k: f"{k[0]}#{k[1]}")
def test_block_runs(key, tmp_path, monkeypatch, capsys):
    lang, code = readme_blocks()[key]
    handler = BLOCKS[key]
    assert (lang == "bash") == (handler is check_bash), f"{key} is a {lang} block"
    handler(code, tmp_path=tmp_path, monkeypatch=monkeypatch, capsys=capsys)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["densenet-efficient", "train", "--no-such-option"], SystemExit),
        (["python", "examples/finetune.py", "data", "--memroy", "8GiB"], SystemExit),
        (["pip", "install", "-e", ".[nosuchextra]"], AssertionError),
        (["make", "all"], AssertionError),
    ],
)
def test_a_wrong_readme_command_fails(argv, error):
    with pytest.raises(error):
        _check_command(argv)


# ---- beyond the blocks: extras, torch.hub's prompt, links -------------------------------------

#: A README command -> the extra it needs (an argv word that marks it); the extra must be installed
#: by a ``pip install`` line earlier in the same block, and the command refuses without it.
NEEDS_EXTRA = {"examples/convert_torchvision.py": "timm", "--sweep": "plot"}

#: Calls that need an extra although the block imports nothing of it.
CALLS_NEEDING_EXTRA = {"torch.onnx.export": "onnx"}


def _extras_used(code: str) -> set[str]:
    """The extras a python block needs: the modules it imports, the calls that load them."""
    tree = ast.parse(code)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    called = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    used = {extra for extra, (modules, _) in EXTRAS.items() if imported & set(modules)}
    return used | {extra for call, extra in CALLS_NEEDING_EXTRA.items() if call in called}


def _section_before(key: tuple[str, int]) -> str:
    """The README text of the block's section up to the block (its prose and earlier blocks)."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f" {key[0]}\n")
    code = readme_blocks()[key][1]
    return text[start : text.index(code, start)]


def test_python_blocks_name_the_extras_they_need():
    needed = set()
    for key, (lang, code) in readme_blocks().items():
        if lang == "python":
            for extra in _extras_used(code):
                needed.add(extra)
                named = re.search(rf"\[([\w,]+,)?{extra}(,[\w,]+)?\]", _section_before(key))
                assert f"[{extra}]" in code or named, f"{key} needs the [{extra}] extra and does not say so"
    assert needed >= {"timm", "onnx"}  # "Use it with ..." needs both


def test_bash_commands_needing_an_extra_install_it_first():
    found = set()
    for lang, code in readme_blocks().values():
        if lang != "bash":
            continue
        installed: set[str] = set()
        for argv in _commands(code):
            if argv[:3] == ["pip", "install", "-e"] and "[" in argv[3]:
                installed |= set(argv[3][argv[3].index("[") + 1 : -1].split(","))
            for word, extra in NEEDS_EXTRA.items():
                if word in argv:
                    found.add(word)
                    assert extra in installed, (
                        f"{shlex.join(argv)} needs the [{extra}] extra installed before it"
                    )
    assert found == set(NEEDS_EXTRA)  # each entry is a command the README runs


@pytest.fixture
def base_install(monkeypatch):
    """The extras' modules look uninstalled, as in ``pip install -e .``."""
    from densenet_efficient import errors

    hidden = {m for modules, _ in EXTRAS.values() for m in modules}
    real = errors.importlib.util.find_spec
    monkeypatch.setattr(
        errors.importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a)
    )


def test_sweep_refuses_without_plot_before_measuring(base_install, monkeypatch, capsys):
    import densenet_efficient.perf.benchmark as bench

    monkeypatch.setattr(bench, "measure", lambda spec: pytest.fail("measured before refusing"))
    assert cli.main(["benchmark", "--sweep", "depth", "--quiet", "--device", "cpu"]) == 2
    assert "[plot] extra" in capsys.readouterr().err


def test_convert_example_refuses_without_timm_before_converting(base_install, monkeypatch, tmp_path):
    from densenet_efficient.errors import MissingExtraError

    monkeypatch.setattr(de, "convert", lambda *a, **k: pytest.fail("converted before refusing"))
    main = runpy.run_path(str(REPO / "examples" / "convert_torchvision.py"))["main"]
    with pytest.raises(MissingExtraError, match=r"needs timm, .*\[timm\] extra"):
        main(["densenet121", str(tmp_path / "out")])


def test_github_hub_loads_do_not_prompt():
    """torch.hub asks "Do you trust this repository" for a GitHub repo or tag it has not seen (an
    EOFError without a terminal) unless ``trust_repo=True``; local checkouts are not asked about."""
    loads = []
    for lang, code in readme_blocks().values():
        if lang == "python":
            loads += [
                n
                for n in ast.walk(ast.parse(code))
                if isinstance(n, ast.Call) and ast.unparse(n.func) == "torch.hub.load"
            ]
    github = [
        n
        for n in loads
        if not any(k.arg == "source" and ast.literal_eval(k.value) == "local" for k in n.keywords)
    ]
    assert len(github) >= 2  # the main branch and the pinned tag
    for call in github:
        trust = [k for k in call.keywords if k.arg == "trust_repo"]
        assert trust and ast.literal_eval(trust[0].value) is True, ast.unparse(call)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", path.read_text(encoding="utf-8"), re.M)}


def test_links_are_absolute_and_resolve():
    """The README is also the package index's page, where relative links break: each link is
    absolute, and a link into this repository names a file (and heading) this checkout has."""
    base = f"https://github.com/{HUB_REPO}/"
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8"))
    assert len(links) >= 10
    for link in links:
        if link.startswith("#"):
            assert link[1:] in _anchors(README), link
            continue
        assert link.startswith(base), f"{link} is relative or outside the project"
        kind, branch, path = link[len(base) :].split("/", 2)
        assert (kind, branch) in {("blob", "main"), ("tree", "main")}, link
        path, _, anchor = path.partition("#")
        assert (REPO / path).exists() and (kind == "tree") == (REPO / path).is_dir(), link
        assert not anchor or anchor in _anchors(REPO / path), link


def test_blocks_run_top_to_bottom_folders_are_saved_before_they_are_loaded():
    """A folder a block loads (``timm``'s ``local-dir:``, ``from_pretrained``) is written by
    ``save_pretrained`` in that block or an earlier one, so the README runs in reading order."""
    saved: list[str] = []
    loads = 0
    for lang, code in readme_blocks().values():  # in README order (dicts keep insertion order)
        if lang != "python":
            continue
        for line in code.splitlines():
            saved += re.findall(r'save_pretrained\("([^"]+)"\)', line)
            for folder in re.findall(r'local-dir:([^"]+)"|from_pretrained\("([^"/]+)"', line):
                name = next(f for f in folder if f)
                loads += 1
                assert name in saved, f"{name!r} is loaded before a block saves it: {line.strip()}"
    assert loads >= 2  # from_pretrained and timm's local-dir
