"""torch.hub entrypoints: memory-efficient DenseNets with torchvision's exact ``state_dict`` layout.

    import torch
    model = torch.hub.load("densenet-efficient/efficient_densenet", "densenet121", pretrained=True)
    model = torch.hub.load("densenet-efficient/efficient_densenet:v0.1.0", "densenet121", weights="DEFAULT")  # a tag
    model = torch.hub.load("path/to/checkout", "densenet_bc", depth=250, memory_efficient=True, source="local")

Every entrypoint takes the builder's arguments: ``weights=`` ("IMAGENET1K_V1", "DEFAULT" or a
torchvision ``DenseNetXXX_Weights`` member), ``pretrained=``, ``progress=``, ``memory_efficient=``
(False/"naive", True/"efficient", "max_saving"), ``num_classes=`` (a different count than the
weights' loads everything but the classifier) and ``drop_rate=``. Pretrained files are
torchvision's, downloaded into torch.hub's cache with their sha256 checked and ``weights_only=True``.

The package is imported only when an entrypoint is called, so ``torch.hub.list`` and
``torch.hub.help`` stay cheap and show nothing but these entrypoints.
"""

# torch.hub finds entrypoints as this module's functions, and listing them must not import the
# package, so one entrypoint per row of the model table (densenet_efficient/models/config.py,
# MODEL_TABLE) is written out below by scripts/generate_files.py; tests/test_generated.py fails
# while they differ from the table.

dependencies = ["torch", "torchvision", "huggingface_hub"]


def _registered(name: str, pretrained: bool, progress: bool, kwargs: dict):
    from densenet_efficient.models import get_model  # here, not at the top: see the module docstring

    return get_model(name, pretrained=pretrained, progress=progress, **kwargs)


# --- begin generated: entrypoints (scripts/generate_files.py, from MODEL_TABLE) ---
def densenet121(pretrained: bool = False, progress: bool = True, **kwargs):
    """DenseNet-121 (k=32, blocks 6-12-24-16, 64 init features, 7,978,856 parameters;
    224x224 inputs, 1000 classes). ImageNet-1K acc@1 74.434 with pretrained=True (IMAGENET1K_V1).

    Example::

        model = torch.hub.load(repo, "densenet121", pretrained=True, memory_efficient=True)
    """
    return _registered("densenet121", pretrained, progress, kwargs)


def densenet161(pretrained: bool = False, progress: bool = True, **kwargs):
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 init features, 28,681,000 parameters;
    224x224 inputs, 1000 classes). ImageNet-1K acc@1 77.138 with pretrained=True (IMAGENET1K_V1).

    Example::

        model = torch.hub.load(repo, "densenet161", pretrained=True, memory_efficient=True)
    """
    return _registered("densenet161", pretrained, progress, kwargs)


def densenet169(pretrained: bool = False, progress: bool = True, **kwargs):
    """DenseNet-169 (k=32, blocks 6-12-32-32, 64 init features, 14,149,480 parameters;
    224x224 inputs, 1000 classes). ImageNet-1K acc@1 75.6 with pretrained=True (IMAGENET1K_V1).

    Example::

        model = torch.hub.load(repo, "densenet169", pretrained=True, memory_efficient=True)
    """
    return _registered("densenet169", pretrained, progress, kwargs)


def densenet201(pretrained: bool = False, progress: bool = True, **kwargs):
    """DenseNet-201 (k=32, blocks 6-12-48-32, 64 init features, 20,013,928 parameters;
    224x224 inputs, 1000 classes). ImageNet-1K acc@1 76.896 with pretrained=True (IMAGENET1K_V1).

    Example::

        model = torch.hub.load(repo, "densenet201", pretrained=True, memory_efficient=True)
    """
    return _registered("densenet201", pretrained, progress, kwargs)


def densenet264(pretrained: bool = False, progress: bool = True, **kwargs):
    """DenseNet-264 (k=32, blocks 6-12-64-48, 64 init features, 33,337,704 parameters;
    224x224 inputs, 1000 classes). No pretrained weights are published: pretrained=True raises and says how to train them.

    Example::

        model = torch.hub.load(repo, "densenet264", memory_efficient=True)
    """
    return _registered("densenet264", pretrained, progress, kwargs)


def densenet_bc_100(pretrained: bool = False, progress: bool = True, **kwargs):
    """CIFAR DenseNet-BC-100 (k=12, blocks 16-16-16, 24 init features, 769,162 parameters;
    32x32 inputs, 10 classes). No pretrained weights are published: pretrained=True raises and says how to train them.

    Example::

        model = torch.hub.load(repo, "densenet_bc_100", memory_efficient=True)
    """
    return _registered("densenet_bc_100", pretrained, progress, kwargs)


# --- end generated: entrypoints ---


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, **kwargs):
    """A CIFAR DenseNet-BC of any depth 6n+4 (3 blocks of n bottleneck layers, 2k init features).

    Example::

        model = torch.hub.load(repo, "densenet_bc", depth=250, growth_rate=24, memory_efficient=True)
    """
    from densenet_efficient.models import densenet_bc as build

    return build(depth, growth_rate=growth_rate, num_classes=num_classes, **kwargs)


def from_pretrained(repo_id_or_path: str, **kwargs):
    """A DenseNet from a ``save_pretrained`` folder or Hugging Face repo id (ours or timm's), in eval mode.

    Takes ``de.from_pretrained``'s arguments (``memory_efficient=``, ``num_classes=``, ``revision=``, ...).

    Example::

        model = torch.hub.load(repo, "from_pretrained", "runs/flowers/best", memory_efficient=True)
    """
    from densenet_efficient.models import from_pretrained as load

    return load(repo_id_or_path, **kwargs)
