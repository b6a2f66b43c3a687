"""Ahead-of-time compilation of every Triton kernel configuration the launchers choose.

Each kernel module in ``scm_ops.kernels`` (and its sub-packages) declares, next to its
kernels, an ``AOT`` table: per kernel the types of its run-time arguments, the input dtypes
its launcher passes and the values of every constexpr that varies at launch (block sizes
the launcher derives from the input, flags), optionally with ``exclude``: combinations the
launchers never make; ``CONFIGS`` gives the fixed block sizes and launch options. This
module compiles every combination for each target of CAPABILITIES, sm_75 (T4), sm_80
(A100), sm_86 (A10, RTX 30), sm_89 (L4, L40, RTX 40) and sm_90 (H100/H200), with an
explicit ``GPUTarget`` (no GPU needed), reads the resources of the compiled cubin
(``cuobjdump --dump-resource-usage``: registers per thread, stack frame, shared memory) and
checks them against budgets:

- shared memory within the chip's opt-in maximum per block (SHARED_MEMORY_LIMIT);
- no register spills: for a kernel with a stack frame the spill stores and loads are read
  from ``ptxas -v`` (with Triton's flags) and must be 0 bytes, unless the kernel's AOT
  entry states ``max_spill_bytes`` (bytes, or a dict of bytes by target, with the reason
  next to it);
- registers within ``max_registers`` where the kernel states one (the hardware allows 255).

bfloat16 variants are compiled for sm_75 too, which has no bfloat16 arithmetic: Triton
converts in software there, and a bfloat16 input on such a chip launches them.

Run as ``python -m scm_ops.aot [--json FILE] [--sm 80,90]`` (exit status 1 on any
failure); it must run without TRITON_INTERPRET, which turns kernels into Python.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

# Shared memory one block may use (opt-in maximum), bytes, by compute capability.
SHARED_MEMORY_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
CAPABILITIES = (75, 80, 86, 89, 90)
INPUT_DTYPES = ("fp16", "bf16", "fp32", "fp64")
LAUNCH_OPTIONS = ("num_warps", "num_stages")
# Triton's values of the launch options a launcher leaves out (CUDA backend).
DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}


def kernel_modules():
    """Every module under scm_ops.kernels that declares an AOT table, by dotted name relative
    to scm_ops.kernels (the name the launchers pass to _common.kernel_module)."""
    package = importlib.import_module("scm_ops.kernels")
    for info in pkgutil.walk_packages(package.__path__, prefix="scm_ops.kernels."):
        module = importlib.import_module(info.name)
        if hasattr(module, "AOT"):
            yield info.name[len("scm_ops.kernels."):], module


def constexpr_names(fn) -> list[str]:
    """Names of the constexpr parameters of a @triton.jit function, compiled (its params)
    or interpreted under TRITON_INTERPRET=1 (its annotations)."""
    params = getattr(fn, "params", None)
    if params is not None:
        return [n for n, p in zip(fn.arg_names, params) if p.is_constexpr]
    parameters = inspect.signature(fn.fn).parameters.values()
    return [p.name for p in parameters
            if getattr(p.annotation, "__name__", str(p.annotation)).split(".")[-1] == "constexpr"]


def variants(module, kernel_name: str):
    """(input dtype, constexprs, launch options) of every launch the launchers can make."""
    fn = getattr(module, kernel_name)
    entry = module.AOT[kernel_name]
    constexpr_args = constexpr_names(fn)
    choices = entry.get("choices", {})
    for dtype in entry.get("dtypes", INPUT_DTYPES):
        acc = "fp64" if dtype == "fp64" else "fp32"
        table = module.CONFIGS.get(kernel_name, module.CONFIGS)
        cfg = dict(table[acc])
        options = {k: cfg.pop(k) for k in LAUNCH_OPTIONS if k in cfg}
        fixed = {k: v for k, v in dict(cfg, IS_FP64=dtype == "fp64").items() if k in constexpr_args}
        for values in itertools.product(*choices.values()):
            constexprs = dict(fixed, **dict(zip(choices, values)))
            if any(all(constexprs.get(k) == v for k, v in rule.items()) for rule in entry.get("exclude", ())):
                continue  # a combination the launchers never make
            missing = set(constexpr_args) - set(constexprs)
            if missing:
                raise RuntimeError(f"{kernel_name}: no value for constexpr {sorted(missing)}; add it to the "
                                   "kernel's CONFIGS or to the choices of its AOT entry")
            yield dtype, constexprs, options


def launch_key(dtype: str, constexprs: dict, options: dict) -> tuple:
    """A hashable description of one launch configuration; launch options the launcher
    leaves out take Triton's defaults (DEFAULT_OPTIONS), as they do when compiled."""
    return dtype, tuple(sorted(constexprs.items())), tuple(sorted(dict(DEFAULT_OPTIONS, **options).items()))


def declared_launches(module, kernel_name: str) -> set:
    """launch_key of every configuration this module compiles for the kernel: the
    launches its launcher may make (scm_ops.check compares the launches it records)."""
    return {launch_key(*v) for v in variants(module, kernel_name)}


def signature(module, kernel_name: str, dtype: str) -> dict:
    fn = getattr(module, kernel_name)
    arg_types = module.AOT[kernel_name]["args"]
    constexpr_args = constexpr_names(fn)
    runtime = [n for n in fn.arg_names if n not in constexpr_args]
    if len(runtime) != len(arg_types):
        raise RuntimeError(f"{kernel_name}: {len(runtime)} run-time arguments, its AOT entry lists {len(arg_types)}")
    acc = "fp64" if dtype == "fp64" else "fp32"
    sig = {n: t.replace("in", dtype).replace("acc", acc) for n, t in zip(runtime, arg_types)}
    sig.update({n: "constexpr" for n in constexpr_args})
    return sig


def cubin_resources(cubin: bytes) -> dict:
    """Registers per thread, stack frame and shared memory (bytes) of a one-kernel cubin."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"cannot read the resource usage of a cubin:\n{out}")
    reg, stack, shared, local = map(int, found.groups())
    return dict(registers=reg, stack_bytes=stack, static_shared_bytes=shared, local_bytes=local)


def spill_bytes(ptx: str, capability: int) -> tuple[int, int]:
    """(spill stores, spill loads) in bytes, from ptxas -v with Triton's own flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def compile_all(capabilities=CAPABILITIES, modules=None) -> list[dict]:
    """Compile every configuration (of the named kernel modules only, if `modules` is given)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for mod_name, module in kernel_modules():
        if modules and mod_name not in modules:
            continue
        for kname, entry in module.AOT.items():
            fn = getattr(module, kname)
            for dtype, constexprs, options in variants(module, kname):
                sig = signature(module, kname, dtype)
                for cap in capabilities:
                    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
                    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
                    res = cubin_resources(compiled.asm["cubin"])
                    shared = int(compiled.metadata.shared)
                    stores, loads = spill_bytes(compiled.asm["ptx"], cap) if res["stack_bytes"] else (0, 0)
                    row = dict(module=mod_name, kernel=kname, dtype=dtype, sm=cap, shared_bytes=shared,
                               registers=res["registers"], stack_bytes=res["stack_bytes"],
                               spill_store_bytes=stores, spill_load_bytes=loads,
                               config=dict({k: v for k, v in constexprs.items() if k != "IS_FP64"}, **options))
                    row["problems"] = problems(row, entry, cap)
                    rows.append(row)
    return rows


def spill_allowance(entry: dict, capability: int) -> int:
    """Spill bytes (stored + loaded) an AOT entry allows on a target: its max_spill_bytes, a
    number for every target or a dict by compute capability; 0 when it states none."""
    allowed = entry.get("max_spill_bytes", 0)
    return allowed.get(capability, 0) if isinstance(allowed, dict) else allowed


def problems(row: dict, entry: dict, capability: int) -> list[str]:
    """What in one compiled configuration breaks its budgets ([] when it fits)."""
    out = []
    if row["shared_bytes"] > SHARED_MEMORY_LIMIT[capability]:
        out.append(f"shared memory {row['shared_bytes']} B > {SHARED_MEMORY_LIMIT[capability]} B")
    spills = row["spill_store_bytes"] + row["spill_load_bytes"]
    allowed = spill_allowance(entry, capability)
    if spills > allowed:
        out.append(f"register spills: {row['spill_store_bytes']} B stored, {row['spill_load_bytes']} B loaded "
                   f"(stack frame {row['stack_bytes']} B) > budget {allowed} B")
    if row["registers"] > entry.get("max_registers", 255):
        out.append(f"{row['registers']} registers > budget {entry.get('max_registers', 255)}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the table as JSON to this file")
    parser.add_argument("--module", action="append", help="only this kernel module (e.g. structured.chebyshev); "
                        "repeatable")
    parser.add_argument("--sm", default=",".join(map(str, CAPABILITIES)),
                        help="comma-separated compute capabilities to compile for (default: %(default)s)")
    args = parser.parse_args(argv)
    capabilities = tuple(int(c) for c in args.sm.split(","))
    unknown = [c for c in capabilities if c not in SHARED_MEMORY_LIMIT]
    if unknown:
        parser.error(f"no shared-memory limit known for sm_{unknown[0]}; known: {sorted(SHARED_MEMORY_LIMIT)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("python -m scm_ops.aot needs triton: pip install 'scm-ops[triton]'", file=sys.stderr)
        return 2
    rows = compile_all(capabilities, modules=args.module)
    for r in rows:
        verdict = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        print(f"{r['kernel']:28s} {r['dtype']:5s} sm_{r['sm']} regs {r['registers']:3d} stack {r['stack_bytes']:5d} B "
              f"shared {r['shared_bytes']:6d} B  {verdict}  {r['config']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["problems"]]
    print(f"{len(rows)} kernel configurations compiled for sm_{'/sm_'.join(map(str, capabilities))}, "
          f"{len(bad)} over budget")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
