"""ImageNet's per-channel normalisation: the one definition.

The weights' transforms (:mod:`.weights`), timm's ``pretrained_cfg`` of a model (:mod:`.hub`) and
the training data's presets (:mod:`densenet_efficient.training.data`) all read it from here.

>>> from densenet_efficient.models.imagenet import IMAGENET_MEAN, IMAGENET_STD
>>> IMAGENET_MEAN
(0.485, 0.456, 0.406)
"""

from __future__ import annotations

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]

#: Per-channel (R, G, B) mean and standard deviation of ImageNet-1k's training images, in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
