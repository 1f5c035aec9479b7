"""The public surface is pinned: the layout can move code, never a name users import."""

from __future__ import annotations

import ast
import inspect

import densenet_efficient as de

from .support import REPO

#: Every name ``import densenet_efficient as de`` offered before the package was split into layers.
PUBLIC = {
    "ARCHITECTURES", "ArchConfig", "CheckpointError", "ConversionError", "ConvertResult", "DenseNet",
    "DenseNet121_Weights", "DenseNet161_Weights", "DenseNet169_Weights", "DenseNet201_Weights",
    "MODES", "MemoryEstimate", "StateDictMismatchError", "WeightsIntegrityError",
    "WeightsNotAvailableError", "WeightsSpec", "convert", "create_model", "densenet121", "densenet161",
    "densenet169", "densenet201", "densenet_bc", "densenet_bc_100", "densenet_bc_config",
    "estimate_memory", "from_pretrained", "get_config", "get_weights", "infer_config",
    "list_architectures", "list_weights", "max_batch_size", "read_checkpoint", "remap_keys",
    "save_hub_folder",
}  # fmt: skip
#: Names added since, in torchvision's style (issue: ecosystem parity).
ADDED = {"get_model", "list_models"}
#: The memory dial (issue: fit any DenseNet into any memory budget).
ADDED |= {"MemoryBudgetError", "MemoryPlan", "fit_memory", "parse_memory"}
#: Which engine runs and why (issue: the engine's loops in C++).
ADDED |= {"EngineStatus", "NativeBuildError", "engine_status"}
#: Synchronised batch norm on any backend (issue: SyncBatchNorm in every engine mode).
ADDED |= {"SyncBatchNorm2d", "convert_sync_batchnorm"}
#: A model registered later is exported under its name too (``@register_model``).
ADDED |= set(de.list_models())

#: torch.hub's entrypoints: every registered model (the four torchvision ones and DenseNet-BC-100
#: among them, PUBLIC pins those), any-depth DenseNet-BC and Hub folders.
HUBCONF_ENTRYPOINTS = set(de.list_models()) | {"densenet_bc", "from_pretrained"}


def test_all_lists_exactly_the_public_names():
    assert set(de.__all__) == PUBLIC | ADDED
    assert len(de.__all__) == len(PUBLIC | ADDED)  # no duplicates
    for name in PUBLIC | ADDED:
        assert getattr(de, name) is not None


def test_public_names_are_not_modules_and_convert_is_the_function():
    assert callable(de.convert) and inspect.isfunction(de.convert)
    assert inspect.isclass(de.DenseNet) and de.DenseNet.__module__ == "densenet_efficient.models.densenet"


def test_hubconf_entrypoints_are_pinned():
    tree = ast.parse((REPO / "hubconf.py").read_text(encoding="utf-8"))
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    assert functions == HUBCONF_ENTRYPOINTS


def test_user_errors_are_value_errors_and_typed():
    from densenet_efficient.errors import UsageError

    for cls in (de.CheckpointError, de.ConversionError, de.WeightsNotAvailableError):
        assert issubclass(cls, UsageError) and issubclass(cls, ValueError)
    try:
        de.densenet_bc(7)
    except UsageError as err:
        assert "6n+4" in str(err)
    else:
        raise AssertionError("depth 7 was accepted")


def test_import_leaves_torchvision_until_the_weights_enums_are_used():
    """``import densenet_efficient`` does not import torchvision (its ``__init__`` imports the whole
    model zoo and torch._dynamo, as long as torch itself); the first use of an enum does, through
    the package, the builders' signatures (torchvision's ``get_model_weights``) or pickle."""
    import subprocess
    import sys

    probe = """
import inspect, pickle, sys
import densenet_efficient as de
assert "torchvision" not in sys.modules and "torch._dynamo" not in sys.modules, "imported at import"
de.densenet121(num_classes=3); de.get_weights("densenet121")  # building and the manifest need no enum
assert "torchvision" not in sys.modules, "imported by a builder"
import torchvision
assert torchvision.models.get_model_weights(de.densenet121) is de.DenseNet121_Weights  # the signature made it
assert isinstance(de.DenseNet161_Weights.DEFAULT, torchvision.models.WeightsEnum)
assert pickle.loads(pickle.dumps(de.DenseNet201_Weights.DEFAULT)) is de.DenseNet201_Weights.IMAGENET1K_V1
sig = inspect.signature(de.densenet169)
assert sig.parameters["weights"].annotation == de.DenseNet169_Weights | str | None
assert str(sig.replace(return_annotation=None)).startswith("(*, weights: densenet_efficient.models.weights")
"""
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
