"""The DenseNet's Hugging Face Hub support: its folder format and the mixin its class inherits.

A folder (or Hub repo) holds ``model.safetensors`` (torchvision's key layout), ``config.json``
and ``README.md``, a model card with Hub metadata and a usage snippet. One module per job:

* :mod:`.config_json` - ``config.json`` both ways, this package's fields and timm's, so timm loads
  the folders of the architectures it has and this package loads timm's DenseNet repos;
* :mod:`.card` - the model card;
* :mod:`.files` - where a folder's or a repo's files are, and one sentence for what goes wrong;
* :mod:`.folder` - the one way a folder is written (atomically) and read back (strictly);
* :mod:`.mixin` - huggingface_hub's ``PyTorchModelHubMixin`` with the above in its hooks, which
  the model class inherits, and :func:`save_hub_folder` / :func:`load_hub_folder`.

How dense blocks execute (``memory_efficient``) is not saved: it is chosen when loading.

>>> import densenet_efficient as de
>>> model = de.densenet_bc_100()

    model.save_pretrained("out/bc100")
    de.from_pretrained("out/bc100", memory_efficient=True)
    de.save_hub_folder(model, "out/bc100", provenance={"trained": "train"}, overwrite=True)
"""

from __future__ import annotations

from .card import CARD_NAME, HUB_REPO, MODEL_CARD_TEMPLATE, PACKAGE_LICENSE, model_card
from .config_json import PRETRAINED_CFG_KEYS, default_pretrained_cfg, hub_config
from .files import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from .mixin import DenseNetHubMixin, load_hub_folder, save_hub_folder

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "HUB_REPO",
    "MODEL_CARD_TEMPLATE",
    "PACKAGE_LICENSE",
    "PICKLE_WEIGHTS_NAME",
    "PRETRAINED_CFG_KEYS",
    "WEIGHTS_NAME",
    "DenseNetHubMixin",
    "default_pretrained_cfg",
    "hub_config",
    "load_hub_folder",
    "model_card",
    "save_hub_folder",
]
