#!/usr/bin/env bash
# GPU check: what a first session on a CUDA machine must see, in under 8 minutes on one H200,
# written to ONE summary file, OUT_DIR/summary.md (each check PASS/FAIL with its numbers):
#   1. the structured ActivationDiffusion kernels (neighbour cosines, matrix-free series,
#      every route of the p = 16 block) on grids 14x14, 32x32, 20x20, 7x7, 1x5, 4/8
#      neighbours, float32/float64, both gradient semantics, B = 64: 20 runs bitwise equal,
#      and against backend="torch";
#   2. every operator on non-contiguous inputs, forward and backward, both backends;
#   3. registers, spills and shared memory of every Triton kernel launched;
#   4. precision against float64 in float32 and bfloat16, and a subnormal-norm cosine row;
#   5. torch, CUDA, Triton and driver versions;
#   6. the benchmarks on CUDA (pytest benchmarks/ --benchmark-only) and their ratio tables.
# Logs, the benchmark JSON and plots go beside it. The whole test suite on CUDA (~5 min)
# runs after that only with --with-tests.
#
#   scripts/gpu_check.sh OUT_DIR [--with-tests]
#
# The machine needs nothing but this repository and an image python3 with torch, triton,
# pytest, pytest-benchmark, hypothesis, scipy, matplotlib (no network: the package is
# installed from this tree with the setuptools already there).
# CPU dry run of sections 1-5 (Triton interpreter, B = 2, 2 repeats; a few minutes):
#   TRITON_INTERPRET=1 python scripts/gpu_check.py --small --summary /tmp/summary.md
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:?usage: scripts/gpu_check.sh OUT_DIR [--with-tests]}")
with_tests=${2:-}
mkdir -p "$out"
summary="$out/summary.md"
export PYTHONUNBUFFERED=1 SCM_OPS_TEST_DEVICE=cuda
unset TRITON_INTERPRET SCM_OPS_BACKEND

site=$(mktemp -d)
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" "$repo" \
        >"$out/install.log" 2>&1; then
    { echo "# scm_ops GPU check"; echo; echo "**FAIL**: the package did not install:"; echo '```';
      tail -30 "$out/install.log"; echo '```'; } >"$summary"
    cat "$summary"; exit 1
fi
export PYTHONPATH="$site"
cd "$site"   # never import scm_ops from the source tree

status=0
echo "== sections 1-5 (scripts/gpu_check.py)"
timeout 330 python3 -P "$repo/scripts/gpu_check.py" --summary "$summary" --budget-s 240 2>&1 | tee "$out/checks.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    status=1
    if [ "$rc" -ne 1 ] || [ ! -s "$summary" ]; then   # 1: checks failed (in the summary); else the script died
        { echo; echo "**FAIL**: scripts/gpu_check.py exited with status $rc (124: time-out); last lines:";
          echo '```'; tail -20 "$out/checks.log"; echo '```'; } >>"$summary"
    fi
fi

echo "== 6. benchmarks on CUDA"
# GPU_CHECK_BENCH_ARGS: extra pytest arguments (e.g. "-m quick") when time is short
timeout 200 python3 -P -m pytest "$repo/benchmarks" -c "$repo/pyproject.toml" --rootdir "$repo" -q \
    -p no:cacheprovider --benchmark-only --benchmark-json="$out/bench.json" ${GPU_CHECK_BENCH_ARGS:-} \
    >"$out/bench.log" 2>&1
bench_rc=$?
{ echo; echo "## 6. Benchmarks on CUDA"; echo
  echo "\`pytest benchmarks/ --benchmark-only ${GPU_CHECK_BENCH_ARGS:-}\` (exit status $bench_rc; 124: the 200 s time-out cut it); ratios"
  echo "against the published stack from the same run; log: bench.log, plots: bench.png, bench_per_cell.png."
  echo; } >>"$summary"
if [ -s "$out/bench.json" ]; then
    python3 "$repo/benchmarks/report.py" "$out/bench.json" --markdown "$out/bench.md" --png "$out/bench.png" \
        --per-cell-png "$out/bench_per_cell.png" >"$out/report.log" 2>&1 || status=1
    sed 's/^#/##/' "$out/bench.md" >>"$summary" 2>/dev/null   # its headings one level down
else
    { echo "**FAIL**: no benchmark JSON; last lines of the log:"; echo '```'; tail -20 "$out/bench.log"; echo '```'; } \
        >>"$summary"
fi
[ "$bench_rc" -eq 0 ] || status=1

if [ "$with_tests" = "--with-tests" ]; then
    echo "== test suite on CUDA"
    # the example's two-process DDP run is a CPU (gloo) test: left to the CPU suite
    timeout 300 python3 -P -m pytest "$repo/tests" -c "$repo/pyproject.toml" --rootdir "$repo" -q \
        -p no:cacheprovider -k "not torchrun" --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
    tests_rc=$?
    { echo; echo "## 7. Test suite on CUDA (exit status $tests_rc)"; echo; echo '```'; tail -15 "$out/tests.log"; echo '```'; } \
        >>"$summary"
    [ "$tests_rc" -eq 0 ] || status=1
else
    { echo; echo "Test suite on CUDA: not run (scripts/gpu_check.sh OUT_DIR --with-tests, about 5 more minutes)."; } \
        >>"$summary"
fi
echo "== summary: $summary"
exit $status
