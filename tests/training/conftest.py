"""Fixtures the training tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..support.fakedata import point_cifar10_at, write_fake_cifar10


@pytest.fixture
def cifar(tmp_path, monkeypatch) -> Path:
    """A tiny CIFAR-10 in the official on-disk format, the data set found there: 100 train images
    (80 after the 20 a run holds out for validation) and 20 test images."""
    root = tmp_path / "cifar"
    point_cifar10_at(monkeypatch, write_fake_cifar10(root, per_batch=20, test_size=20))
    return root
