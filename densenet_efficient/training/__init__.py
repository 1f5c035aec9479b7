"""Training and fine-tuning: settings, data, distributed setup, run folders and the loop.

* :mod:`.config` - :class:`TrainConfig`, data-dependent defaults and validation.
* :mod:`.data` - the embedded digits set, CIFAR, ImageFolders; splits and transforms.
* :mod:`.distributed` - joining a ``torchrun`` process group.
* :mod:`.checkpoint` - the run folder: resumable checkpoint, CSV log, best/last model folders.
* :mod:`.loop` - :func:`train`.
"""

from .config import NonFiniteLossError, TrainConfig, TrainResult
from .loop import evaluate, train

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "evaluate", "train"]
