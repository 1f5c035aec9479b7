"""scripts/op_peaks.py: each op's transient memory in a real CPU step, against the planner's model."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from densenet_efficient.perf.measure import MEMORY_ENV

from ..support import REPO


def test_op_peaks_finds_the_convolution_backward_transient_the_model_accounts_for():
    """On DenseNet-BC-40 the step peaks inside a convolution's backward (oneDNN's reorders), and
    the model's figure for that op is within half a MiB of the transient measured."""
    env = {**os.environ, **MEMORY_ENV, "PYTHONPATH": str(REPO)}
    argv = ["--arch", "densenet_bc_40", "--batch-size", "4", "--image-size", "32", "--mode", "max_saving"]
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "op_peaks.py"), *argv],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout  # fmt: skip
    peak = re.search(r"step peak [\d.]+ MiB .* in op \d+ of \d+: (\S+) .*transient ([\d.]+) MiB, modelled ([\d.]+) MiB", out)
    assert peak, out
    assert peak.group(1) == "aten.convolution_backward.default"
    assert abs(float(peak.group(2)) - float(peak.group(3))) < 0.5, out
    assert "largest transient beyond the model" in out and "around the peak" in out
