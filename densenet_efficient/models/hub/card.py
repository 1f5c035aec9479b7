"""The model card (``README.md``) of a model folder: YAML metadata, a summary, a usage snippet,
the model's details and, when given, its provenance.

:class:`~.mixin.DenseNetHubMixin` hands :data:`MODEL_CARD_TEMPLATE` to huggingface_hub's mixin
(its ``model_card_template``) and renders it through :func:`render_card`; the card's metadata is
the class header's with this model's own licence (its weights', not the code's).

    card = render_card(model, provenance={"source": "densenet121-a639ec97.pth"}, repo_id="org/d121")
    card.save("out/README.md")
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from ...errors import UsageError
from .config_json import hub_config

__all__ = [
    "CARD_KWARGS",
    "CARD_NAME",
    "HUB_REPO",
    "LIBRARY_NAME",
    "MODEL_CARD_TEMPLATE",
    "PACKAGE_LICENSE",
    "check_card_kwargs",
    "is_package_card",
    "model_card",
    "render_card",
]

CARD_NAME = "README.md"
#: This project's GitHub repository, the one ``torch.hub.load`` takes: the organisation is named here
#: only (README.md and hubconf.py quote it; ``tests/test_hubconf.py`` checks they agree). Pin a
#: release with a tag, ``torch.hub.load(f"{HUB_REPO}:v0.1.0", ...)``; a checkout loads with
#: ``torch.hub.load("path/to/checkout", ..., source="local")``.
HUB_REPO = "densenet-efficient/efficient_densenet"
PACKAGE_LICENSE = "mit"  # the code's licence; weights carry their own in pretrained_cfg
#: The card's ``library_name``: how a card this package wrote is told from one a person wrote.
LIBRARY_NAME = "densenet_efficient"
#: What ``model_card_kwargs`` (of ``save_pretrained`` / ``push_to_hub``) may hold.
CARD_KWARGS = ("provenance", "repo_id", "license")
#: A card this package writes is a few kB; a larger README.md is someone else's, and is not read.
_LARGEST_CARD = 1 << 20

#: The model card (``README.md``), a Jinja template as huggingface_hub's mixin expects
#: (``model_card_template=`` in :class:`DenseNetHubMixin`'s header); :func:`render_card` fills it.
MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}: {{ parameters }} parameters, {{ num_classes }} classes. A memory-efficient DenseNet from [densenet_efficient]({{ repo_url }}) with torchvision's exact `state_dict` layout.

## Usage

```python
import torch
import densenet_efficient as de

model = de.from_pretrained("{{ repo_id }}", memory_efficient=True).eval()
with torch.no_grad():
    logits = model(torch.randn(1, 3, {{ size }}, {{ size }}))
```

`memory_efficient` (`False`/"naive", `True`/"efficient", "max_saving") is chosen at load time: it changes training memory and speed, never the weights.

## Model details

| field | value |
|---|---|
{% for key, value in details %}| {{ key }} | `{{ value }}` |
{% endfor %}| parameters | {{ parameters }} |
| minimum input size | {{ min_size }}x{{ min_size }} |
{% if provenance %}
## Provenance

{% for key, value in provenance %}- **{{ key }}**: {{ value }}
{% endfor %}{% endif %}"""


def render_card(
    model: nn.Module,
    *,
    provenance: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> Any:
    """:data:`MODEL_CARD_TEMPLATE` filled for ``model``, as a ``huggingface_hub.ModelCard``."""
    from huggingface_hub import ModelCard

    return ModelCard.from_template(
        _card_data(model, license),
        template_str=type(model)._hub_mixin_info.model_card_template,
        **_card_fields(model, provenance, repo_id),
    )


def _card_data(model: nn.Module, license: str | None) -> Any:
    """The card's YAML metadata: the class header's, with this model's licence (its weights', not
    the code's) and the tags of where its weights came from."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(**type(model)._hub_mixin_info.model_card_data.to_dict())
    data.license = (license or model.pretrained_cfg.get("license") or PACKAGE_LICENSE).lower()
    origin = str(model.pretrained_cfg.get("origin_url") or model.pretrained_cfg.get("hf_hub_id") or "")
    for source, tag in (("download.pytorch.org", "torchvision"), ("timm/", "timm")):
        if source in origin and tag not in data.tags:
            data.tags = [*data.tags, tag]
    return data


def _card_fields(
    model: nn.Module, provenance: Mapping[str, Any] | None, repo_id: str | None
) -> dict[str, Any]:
    """The values :data:`MODEL_CARD_TEMPLATE` shows, each formatted as it appears."""
    cfg = model.arch_config
    params = f"{sum(p.numel() for p in model.parameters()):,}"
    title = cfg.architecture_name(ignore_classes=True)
    return {
        "title": title or f"DenseNet (k={cfg.growth_rate}, blocks={tuple(cfg.block_config)})",
        "description": cfg.describe(),
        "parameters": params,
        "num_classes": cfg.num_classes,
        "repo_url": type(model)._hub_mixin_info.repo_url,
        "repo_id": repo_id or "<repo id or local folder>",
        "size": cfg.default_resolution,
        "details": [(k, json.dumps(v)) for k, v in hub_config(model).items()],
        "min_size": cfg.min_input_size(),
        "provenance": [
            (k, v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))
            for k, v in (provenance or {}).items()
        ],
    }


def model_card(
    model: nn.Module,
    *,
    provenance: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md of a Hub folder: YAML metadata, a summary, a usage snippet and (optionally)
    provenance; ``model.generate_model_card(...)`` as text."""
    return str(model.generate_model_card(provenance=provenance, repo_id=repo_id, license=license))


def check_card_kwargs(model_card_kwargs: Mapping[str, Any] | None) -> None:
    """Refuse ``model_card_kwargs`` the card has no place for, before anything is written."""
    unknown = sorted(set(model_card_kwargs or {}) - set(CARD_KWARGS))
    if unknown:
        raise UsageError(
            f"unknown model_card_kwargs {', '.join(unknown)}; expected some of {', '.join(CARD_KWARGS)}"
        )


def is_package_card(path: Path) -> bool:
    """Whether ``path`` is a model card this package wrote (its metadata's ``library_name`` is
    :data:`LIBRARY_NAME`): such a card describes the files beside it and is rewritten with them;
    any other README.md (a person's, another library's, unreadable) is not this package's to replace."""
    import stat

    from huggingface_hub.repocard import metadata_load

    try:
        info = path.lstat()  # a link, FIFO or device is a person's doing, and a FIFO would block a read
        if not stat.S_ISREG(info.st_mode) or info.st_size > _LARGEST_CARD:
            return False
        return (metadata_load(path) or {}).get("library_name") == LIBRARY_NAME
    except Exception:  # not UTF-8, bad YAML, a folder, unreadable: not a card this package wrote
        return False
