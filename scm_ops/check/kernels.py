"""The self-check's groups "launches" (every kernel launch was a configuration the AOT check
compiles) and "resources" (registers and spills of the compiled kernels)."""
from __future__ import annotations

import contextlib

import torch

from .report import Context, Report

# -- launches: which kernels ran, with which configurations -----------------------------------

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _describe_launch(module, kernel_name: str, fn, args, kwargs) -> tuple:
    """aot.launch_key of one launch: the input dtype (of the first "*in" pointer argument,
    else the first "*acc" one), the constexprs and the launch options."""
    from .. import aot
    constexpr_args = aot.constexpr_names(fn)
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    runtime = [n for n in fn.arg_names if n not in constexpr_args]
    types = dict(zip(runtime, module.AOT[kernel_name]["args"]))
    dtype = None
    for wanted in ("*in", "*acc"):
        tensors = [bound[n] for n in runtime if types.get(n) == wanted and isinstance(bound.get(n), torch.Tensor)]
        if tensors:
            dtype = _DTYPE_NAMES.get(tensors[0].dtype, str(tensors[0].dtype))
            break
    constexprs = {n: bound[n] for n in constexpr_args if n in bound}
    options = {k: kwargs[k] for k in aot.LAUNCH_OPTIONS if k in kwargs}
    return aot.launch_key(dtype, constexprs, options)


def aot_kernels():
    """(kernel module name, module, kernel name, @triton.jit function) of every kernel that
    the AOT tables declare."""
    from .. import aot
    for mod_name, module in aot.kernel_modules():
        for kernel_name in module.AOT:
            yield mod_name, module, kernel_name, getattr(module, kernel_name)


@contextlib.contextmanager
def recording_launches(launches: list):
    """Append (module name, kernel name, aot.launch_key) to `launches` for every launch of a
    kernel of the AOT tables while the context is open (the kernels' `run` is wrapped on the
    instance and restored on exit)."""
    wrapped = []
    try:
        for mod_name, module, kernel_name, fn in aot_kernels():
            original = fn.run

            def run(*args, _original=original, _module=module, _name=kernel_name, _mod_name=mod_name, _fn=fn,
                    **kwargs):
                try:
                    launches.append((_mod_name, _name, _describe_launch(_module, _name, _fn, args, kwargs)))
                except Exception as err:  # noqa: BLE001 - a launch the table cannot describe
                    launches.append((_mod_name, _name, ("undescribed", repr(err))))
                return _original(*args, **kwargs)

            fn.run = run
            wrapped.append(fn)
        yield launches
    finally:
        for fn in wrapped:
            del fn.run


def check_launches(report: Report, ctx: Context, complete: bool) -> None:
    """Every launch was a configuration the AOT check compiles; with `complete` (the groups
    that launch kernels all ran), every kernel ran at least once."""
    from .. import aot
    declared = {}
    kernels = []
    for mod_name, module, kernel_name, _ in aot_kernels():
        declared[(mod_name, kernel_name)] = aot.declared_launches(module, kernel_name)
        kernels.append((mod_name, kernel_name))
    seen = {}
    for mod_name, kernel_name, key in ctx.launches:
        seen.setdefault((mod_name, kernel_name), set()).add(key)
    undeclared = [(k, key) for k, keys in seen.items() for key in keys if key not in declared.get(k, ())]
    configs = sum(len(v) for v in seen.values())
    report.check(not undeclared, "launches", "every launch is a configuration python -m scm_ops.aot compiles",
                 f"{len(ctx.launches)} launches, {configs} distinct configurations of {len(seen)} kernels" +
                 ("" if not undeclared else "; NOT DECLARED: " + "; ".join(
                     f"{name} {_key_text(key)}" for (_, name), key in undeclared[:8])))
    for (mod_name, kernel_name), keys in sorted(seen.items()):
        report.line(f"      {kernel_name}: " + "; ".join(_key_text(k) for k in sorted(keys, key=str)))
    if complete:
        missing = [name for mod_name, name in kernels if (mod_name, name) not in seen]
        report.check(not missing, "launches", f"every kernel of the AOT tables ran ({len(kernels)})",
                     "all ran" if not missing else "never launched: " + ", ".join(missing))
    else:
        report.result("SKIP", "launches", "every kernel of the AOT tables ran",
                      "needs the groups operators and diffusion")


def _key_text(key) -> str:
    if len(key) != 3 or not isinstance(key[1], tuple):
        return str(key)
    dtype, constexprs, options = key
    return f"{dtype} " + ", ".join(f"{k}={v}" for k, v in constexprs + options)


# -- resources: registers and spills of the compiled kernels -----------------------------------

def _compiled(fn):
    """(key, compiled kernel) of every compiled specialisation of a JITFunction:
    `device_caches` (Triton >= 3.2) or `cache` (older)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        for entry in list(caches.values()):
            for key, kernel in list(entry[0].items()):
                yield key, kernel
    else:
        for entry in list(getattr(fn, "cache", {}).values()):
            for key, kernel in list(entry.items()):
                yield key, kernel


def _constants_text(fn, kernel) -> str:
    constants = getattr(getattr(kernel, "src", None), "constants", None)
    if not isinstance(constants, dict):
        return ""
    names = set(getattr(fn, "arg_names", ()))
    out = []
    for k, v in constants.items():
        i = k[0] if isinstance(k, tuple) and len(k) == 1 else k   # keyed by (argument index,) in recent Triton
        name = fn.arg_names[i] if isinstance(i, int) and i < len(fn.arg_names) else k
        if name in names and not callable(v) and str(name).isupper():
            out.append(f"{name}={v}")
    return ", ".join(out)


def check_resources(report: Report, ctx: Context) -> None:
    if ctx.interpreted:
        report.line("      registers/spills: not available (Triton interpreter: nothing is compiled)")
        return
    from .. import aot
    props = torch.cuda.get_device_properties(ctx.device)
    capability = 10 * props.major + props.minor
    rows = 0
    unavailable = False
    for _, module, kernel_name, fn in aot_kernels():
        allowance = aot.spill_allowance(module.AOT[kernel_name], capability)
        for _, kernel in _compiled(fn):
            if not hasattr(kernel, "metadata"):   # an unfinished asynchronous compile
                continue
            with contextlib.suppress(Exception):
                kernel._init_handles()            # done at the first launch: a no-op here
            md = kernel.metadata
            regs, spills = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
            where = (f"{kernel_name} [{_constants_text(fn, kernel)}, num_warps={getattr(md, 'num_warps', '?')}, "
                     f"num_stages={getattr(md, 'num_stages', '?')}]")
            rows += 1
            if regs is None or spills is None:
                unavailable = True
                report.line(f"      {where}: registers/spills not available (this Triton version does not expose "
                            f"n_regs/n_spills); shared {getattr(md, 'shared', '?')} B")
                continue
            # n_spills: the local memory per thread as the driver reports it, in 4-byte words
            report.check(spills * 4 <= allowance, "resources", where,
                         f"{regs} registers/thread, {spills} spilled words ({spills * 4} B; allowed {allowance} B), "
                         f"shared {getattr(md, 'shared', '?')} B")
    if rows == 0:
        report.line("      registers/spills: no compiled kernel found in the kernels' caches")
    elif unavailable:
        report.line("      (registers/spills: not available from this Triton version for some kernels)")

