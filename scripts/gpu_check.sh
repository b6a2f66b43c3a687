#!/usr/bin/env bash
# GPU check: on a CUDA machine with nothing but this repository (and the image's python3
# with torch, triton, pytest, pytest-benchmark, hypothesis, scipy), run the whole test suite
# on CUDA tensors (both backends: Triton kernels compiled for the GPU, every dtype incl.
# bfloat16), then the benchmarks, and write logs and JSON under OUT_DIR.
#   scripts/gpu_check.sh OUT_DIR          (about 8 minutes on one H200)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:?usage: scripts/gpu_check.sh OUT_DIR}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SCM_OPS_TEST_DEVICE=cuda
unset TRITON_INTERPRET SCM_OPS_BACKEND

site=$(mktemp -d)
# No network there: build the wheel with the setuptools already installed.
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" "$repo" \
        >"$out/install.log" 2>&1; then
    cat "$out/install.log"; exit 1
fi
export PYTHONPATH="$site"
cd "$site"   # never import scm_ops from the source tree
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } \
    >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

status=0
echo "== tests on CUDA"
# the example's two-process DDP run is a CPU (gloo) test: left to the CPU suite
timeout 300 python3 -P -m pytest "$repo/tests" -c "$repo/pyproject.toml" --rootdir "$repo" -q \
    -p no:cacheprovider -k "not torchrun" --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log" || status=1
echo "== benchmarks on CUDA"
timeout 220 python3 -P -m pytest "$repo/benchmarks" -c "$repo/pyproject.toml" --rootdir "$repo" -q \
    -p no:cacheprovider --benchmark-only --benchmark-json="$out/bench.json" 2>&1 | tee "$out/bench.log" || status=1
python3 "$repo/benchmarks/report.py" "$out/bench.json" --markdown "$out/bench.md" --png "$out/bench.png" \
    2>&1 | tee "$out/report.log" || status=1
exit $status
