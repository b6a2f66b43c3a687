"""Ahead-of-time compilation of every Triton kernel configuration the launchers choose.

Compiles each kernel, for each input dtype and its block configuration, for sm_80 (A100)
and sm_90 (H100/H200) with an explicit ``GPUTarget`` (no GPU needed) and checks that the
shared memory it asks for fits the chip. Run as ``python -m scm_ops.aot`` (exit status 1
on any failure); it must run without TRITON_INTERPRET, which turns kernels into Python.
"""
from __future__ import annotations

import argparse
import json
import sys

# Shared memory one block may use (opt-in maximum), bytes.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
INPUT_DTYPES = ("fp16", "bf16", "fp32", "fp64")

# kernel module -> kernel name -> ordered arguments. Pointer roles: "in" has the input's
# dtype, "acc" the accumulation dtype (fp32, fp64 for fp64 inputs); "i32" integer scalars;
# "fp32" float scalars; constexprs are filled from the launcher's config.
KERNELS = {
    "cosine": {
        "cosine_fwd_kernel": ["*in", "*in", "*acc", "i32", "i32"] + ["i32"] * 6,
        "cosine_bwd_kernel": ["*in", "*in", "*in", "*acc", "*in", "i32", "i32"] + ["i32"] * 9,
    },
    "laplacian": {
        "laplacian_fwd_kernel": ["*in", "*in", "*in", "i32", "i32", "i32"] + ["i32"] * 3,
        "laplacian_bwd_kernel": ["*in", "*in", "*in", "*in", "*acc", "i32", "i32", "i32"] + ["i32"] * 6,
    },
    # Newton-Schulz runs its products in the accumulation dtype.
    "newton_schulz": {
        "bmm_axpby_kernel": ["*acc"] * 4 + ["i32"] * 3 + ["fp32"] * 2 + ["i32"] * 12,
    },
    "stencil": {
        "neighbour_cosine_fwd_kernel": ["*in"] * 3 + ["i32"] * 3,
        "neighbour_cosine_bwd_kernel": ["*in"] * 4 + ["i32"] * 3,
        "stencil_series_fwd_kernel": ["*in"] * 8 + ["i32"] * 4,
        "stencil_series_bwd_kernel": ["*in"] * 10 + ["i32"] * 4,
    },
}
# Input dtypes per module (default INPUT_DTYPES): Newton-Schulz runs its products in the
# accumulation dtype; the structured path (ActivationDiffusion) takes float32 and float64.
MODULE_DTYPES = {"newton_schulz": ("fp32", "fp64"), "stencil": ("fp32", "fp64")}
# Constexprs that take several values at run time: flags, and sizes the launcher derives
# from the input (BLOCK_N of the series: the next power of two >= H * W; 256 covers the
# published 14 x 14 grid, 1024 grids up to 32 x 32).
FLAGS = {"EIGHT_NEIGHBOURS": (False, True), "HAS_C": (False, True), "EXACT": (False, True)}
LAUNCH_SIZES = {"stencil": {"BLOCK_N": (256, 1024)}}


def _variants(module, kernel_fn, dtype: str):
    """(signature, constexprs, options) for every launch the launchers can make."""
    import itertools

    acc = "fp64" if dtype == "fp64" else "fp32"
    cfg = dict(module.CONFIGS[acc])
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    names = list(kernel_fn.arg_names)
    constexpr_names = [kernel_fn.params[i].name for i in range(len(names)) if kernel_fn.params[i].is_constexpr]
    runtime = [n for n in names if n not in constexpr_names]
    choices = dict(FLAGS, **LAUNCH_SIZES.get(module.__name__.rsplit(".", 1)[-1], {}))
    varying = [n for n in constexpr_names if n in choices]
    fixed = {k: v for k, v in dict(cfg, IS_FP64=dtype == "fp64").items() if k in constexpr_names}
    for values in itertools.product(*(choices[f] for f in varying)):
        constexprs = dict(fixed, **dict(zip(varying, values)))
        missing = set(constexpr_names) - set(constexprs)
        if missing:
            raise RuntimeError(f"{kernel_fn.__name__}: no value for constexpr {sorted(missing)}")
        yield runtime, constexpr_names, constexprs, options


def compile_all(capabilities=(80, 90)) -> list[dict]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for mod_name, kernels in KERNELS.items():
        module = importlib.import_module(f"scm_ops.kernels.{mod_name}")
        for kname, arg_types in kernels.items():
            fn = getattr(module, kname)
            dtypes = MODULE_DTYPES.get(mod_name, INPUT_DTYPES)
            for dtype in dtypes:
                acc = "fp64" if dtype == "fp64" else "fp32"
                for runtime, cnames, constexprs, options in _variants(module, fn, dtype):
                    if len(runtime) != len(arg_types):
                        raise RuntimeError(f"{kname}: {len(runtime)} runtime args, table has {len(arg_types)}")
                    types = [t.replace("in", dtype).replace("acc", acc) for t in arg_types]
                    signature = dict(zip(runtime, types))
                    signature.update({n: "constexpr" for n in cnames})
                    for cap in capabilities:
                        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
                        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
                        shared = int(compiled.metadata.shared)
                        flags = {k: v for k, v in constexprs.items() if k in FLAGS or k == "IS_FP64"}
                        rows.append(dict(kernel=kname, dtype=dtype, sm=cap, shared_bytes=shared,
                                         limit_bytes=SHARED_MEMORY_LIMIT[cap],
                                         fits=shared <= SHARED_MEMORY_LIMIT[cap],
                                         config={k: v for k, v in constexprs.items()
                                                 if k.startswith("BLOCK")} | options | flags))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the table as JSON to this file")
    args = parser.parse_args(argv)
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    rows = compile_all()
    for r in rows:
        print(f"{r['kernel']:24s} {r['dtype']:5s} sm_{r['sm']} shared {r['shared_bytes']:6d} B "
              f"/ {r['limit_bytes']} {'ok' if r['fits'] else 'TOO LARGE'}  {r['config']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["fits"]]
    print(f"{len(rows)} kernel configurations compiled, {len(bad)} over the shared-memory limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
