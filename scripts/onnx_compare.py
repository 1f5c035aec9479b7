#!/usr/bin/env python
"""Export densenet121 (ours in each memory mode, and torchvision's) to ONNX with both exporters and
compare node counts, export time and onnxruntime latency, side by side in one process.

    python scripts/onnx_compare.py                 # densenet121, batch 1, 224x224, 20 runs
    python scripts/onnx_compare.py --runs 50 --threads 2

Latency is the median of ``--runs`` onnxruntime calls after two warm-up calls, sessions run
interleaved (A B C A B C ...) so that a shared machine's drift hits every row alike.

It imports the installed package: run it from a checkout after
``pip install -e .`` (or with ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torchvision

import densenet_efficient as de
from densenet_efficient.cli import run_script
from densenet_efficient.errors import require_extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    require_extra("onnx", "scripts/onnx_compare.py")
    import onnx
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, args.image_size, args.image_size)
    reference = torchvision.models.densenet121().eval()
    models = {"torchvision": reference}
    for mode in de.MODES:
        models[f"ours {mode}"] = de.densenet121(memory_efficient=mode).eval()
        models[f"ours {mode}"].load_state_dict(reference.state_dict())
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dynamo in (False, True):
            for name, model in models.items():
                path = Path(tmp) / f"{name}-{dynamo}.onnx".replace(" ", "_")
                start = time.perf_counter()
                torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
                seconds = time.perf_counter() - start
                ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
                key = (name, "dynamo" if dynamo else "legacy")
                sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                rows.append({"key": key, "nodes": sum(ops.values()), "ops": ops, "export_s": seconds})
        feed = x.numpy()
        times = {row["key"]: [] for row in rows}
        for session in sessions.values():  # warm-up
            for _ in range(2):
                session.run(None, {session.get_inputs()[0].name: feed})
        for _ in range(args.runs):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {session.get_inputs()[0].name: feed})
                times[key].append(time.perf_counter() - start)
    print(f"densenet121, batch 1, {args.image_size}x{args.image_size}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {args.threads} threads")  # fmt: skip
    print("| model | exporter | ONNX nodes | Concat | ScatterND | Slice | export s | ORT ms (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        name, exporter = row["key"]
        ms = 1000 * statistics.median(times[row["key"]])
        ops = row["ops"]
        print(
            f"| {name} | {exporter} | {row['nodes']} | {ops['Concat']} | {ops['ScatterND']} | {ops['Slice']} "
            f"| {row['export_s']:.1f} | {ms:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(run_script("scripts/onnx_compare.py", main))
