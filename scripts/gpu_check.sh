#!/usr/bin/env bash
# GPU check: what a first run on a CUDA machine must see, written to ONE summary file,
# OUT_DIR/summary.md:
#   1. the self-check, python -m scm_ops.check (also installed as scm-ops-check): device,
#      compute capability and versions; every Triton kernel and ActivationDiffusion (every
#      large-p route, both gradient semantics, 4 and 8 neighbours, float32/float64/bfloat16,
#      grids 1 x N, 7 x 9, 14 x 14 and the largest one program holds) against backend="torch",
#      bitwise repeatability, non-contiguous inputs, launches against the AOT tables,
#      registers and spills of the kernels launched, the time of each large-p route; one
#      PASS/FAIL line per check (its output: checks.log, check.json);
#   2. the benchmarks on CUDA (pytest benchmarks/ --benchmark-only) and their ratio tables.
# Logs, the benchmark JSON and plots go beside it. The whole test suite on CUDA (~5 min)
# runs after that only with --with-tests.
#
#   scripts/gpu_check.sh OUT_DIR [--with-tests]
#
# The machine needs nothing but this repository and an image python3 with torch, triton,
# pytest, pytest-benchmark, hypothesis, scipy, matplotlib (no network: the package is
# installed from this tree with the setuptools already there).
# GPU_CHECK_BUDGET_S: the self-check's budget in seconds (default 300; checks not started by
# then are listed as SKIP). CPU dry run of the self-check (Triton interpreter, small shapes,
# about a minute): python -m scm_ops.check
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
echo "== 1. self-check (python -m scm_ops.check)"
budget=${GPU_CHECK_BUDGET_S:-300}
timeout $((budget + 120)) python3 -P -m scm_ops.check --budget-s "$budget" --json "$out/check.json" 2>&1 \
    | tee "$out/checks.log"
rc=${PIPESTATUS[0]}
{ echo "# scm_ops GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"; echo
  echo "## 1. Self-check: python -m scm_ops.check (exit status $rc; 124: the time-out cut it)"; echo
  grep -E '^== (ALL CHECKS PASS|[0-9]+ CHECK)' "$out/checks.log" | sed 's/^== /**/; s/$/**/'; echo
  echo '```'; cat "$out/checks.log"; echo '```'; } >"$summary"
[ "$rc" -eq 0 ] || status=1

echo "== 2. benchmarks on CUDA"
# GPU_CHECK_BENCH_ARGS: extra pytest arguments (e.g. "-m quick") when time is short
timeout 200 python3 -P -m pytest "$repo/benchmarks" -c "$repo/pyproject.toml" --rootdir "$repo" -q \
    -p no:cacheprovider --benchmark-only --benchmark-json="$out/bench.json" ${GPU_CHECK_BENCH_ARGS:-} \
    >"$out/bench.log" 2>&1
bench_rc=$?
{ echo; echo "## 2. Benchmarks on CUDA"; echo
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
    { echo; echo "## 3. Test suite on CUDA (exit status $tests_rc)"; echo; echo '```'; tail -15 "$out/tests.log"; echo '```'; } \
        >>"$summary"
    [ "$tests_rc" -eq 0 ] || status=1
else
    { echo; echo "Test suite on CUDA: not run (scripts/gpu_check.sh OUT_DIR --with-tests, about 5 more minutes)."; } \
        >>"$summary"
fi
echo "== summary: $summary"
exit $status
