#!/usr/bin/env bash
# GPU readiness in one command: correctness on CUDA, the benchmark table (compiled peer included),
# densenet121 batch 256 bf16, planner vs measurement. Writes docs/gpu_check.md and prints it.
#
#   bash scripts/gpu_check.sh                 # from the repository root, on a CUDA machine (~8 min)
#   bash scripts/gpu_check.sh --quick         # tiny sizes (a smoke test of the script)
#
# Extra arguments go to scripts/gpu_check.py (--out, --quick, --device, --time-budget).
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import torch, torchvision" 2>/dev/null; then
    echo "gpu_check: error: '$PYTHON' cannot import torch and torchvision; install them first" \
         "(this check needs no network otherwise, and installs nothing itself)" >&2
    exit 2
fi
case " $* " in
    *" --device cpu "*) ;;
    *)
        if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
            echo "gpu_check: error: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA device" \
                 "(pass --device cpu to check the script's plumbing on a CPU)" >&2
            exit 2
        fi
        ;;
esac
exec "$PYTHON" scripts/gpu_check.py "$@"
