"""Files in and out, with no knowledge of models: the bottom layer of the package.

* :mod:`.atomic` - the one atomic writer: a file through a temporary sibling, or a new folder
  staged beside its destination and renamed into place.
* :mod:`.checkpoint` - reading any checkpoint safely (``torch.load(weights_only=True)`` or
  safetensors) and finding the weights inside it; sha256 of a file.
* :mod:`.download` - hash-checked downloads (torch.hub's ``name-<sha256 prefix>.ext`` rule).
* :mod:`.state_dict` - renaming legacy DenseNet keys to torchvision's layout and strict checks
  that name the first mismatching keys.
"""
