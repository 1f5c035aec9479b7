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
