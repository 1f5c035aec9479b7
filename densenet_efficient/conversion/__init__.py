"""Conversion: any DenseNet checkpoint -> a verified Hugging Face Hub folder.

* :mod:`.sources` - find the file a SRC names (file, Hub folder, URL, architecture name).
* :mod:`.infer` - rename keys to torchvision's layout, read the architecture off the shapes.
* :mod:`.verify` - the source model and the output comparison.
* :mod:`.converter` - the steps in order, written atomically: :func:`convert`.
"""

from .converter import ConvertResult, convert, convert_all_torchvision, torchvision_architectures
from .infer import ConversionError, infer_config, normalize_keys
from .verify import TOLERANCE

__all__ = [
    "TOLERANCE",
    "ConversionError",
    "ConvertResult",
    "convert",
    "convert_all_torchvision",
    "infer_config",
    "normalize_keys",
    "torchvision_architectures",
]
