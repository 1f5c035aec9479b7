"""The one unpickler turns every damaged torch file into one CheckpointError, never another exception."""

from __future__ import annotations

import random

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.io.checkpoint import CheckpointError, load_torch_file


@pytest.fixture(scope="module")
def legacy_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "bc10.pth"
    torch.save(de.densenet_bc(10).state_dict(), path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


def test_legacy_file_cut_anywhere_is_a_checkpoint_error(legacy_bytes, tmp_path):
    """Cut inside the tensor data (5000, 6000, 8000 bytes for bc10) was a struct.error."""
    path = tmp_path / "cut.pth"
    for size in [5000, 6000, 8000, *range(0, len(legacy_bytes), 1999)]:
        path.write_bytes(legacy_bytes[:size])
        with pytest.raises(CheckpointError, match="truncated or corrupt torch file"):
            load_torch_file(path)


def test_flipped_bits_load_or_fail_as_checkpoint_error(legacy_bytes, tmp_path):
    """Damaged storage records raised AssertionError/TypeError from the unpickler."""
    rng = random.Random(0)
    path = tmp_path / "flipped.pth"
    failures = 0
    for _ in range(300):
        data = bytearray(legacy_bytes)
        for _ in range(3):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            load_torch_file(path)  # flips in tensor data load (only a hash can catch those)
        except CheckpointError:
            failures += 1
    assert failures > 0
