"""The structured path's CPU kernels (kernels/structured/cpu.c): C loops that run a series one
image at a time, its vectors in cache, instead of a few PyTorch operations per step
(docs/structured.md, "CPU kernels").

They are compiled at first use with the system's C compiler (`CC`, else `cc`; OpenMP where it
builds, `-march=native`), cached on disk per source, compiler and CPU in a private directory
(`$SCM_OPS_CACHE_DIR/cpu`, else ~/.cache/scm_ops/cpu; scm_ops/cache.py: mode 0700, a cached
library is loaded only where the directory and the file are this user's and writable by nobody
else, else refused with a warning and built again), and called through ctypes. Where no
private cache can be used they are built into a private temporary directory of the process.
Where no compiler builds them, or with SCM_OPS_CPU_KERNELS=0, `library` returns None and the
PyTorch loops run: the same arithmetic, slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import pathlib
import platform
import struct
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import torch

from ..cache import UntrustedCacheError, cache_root, open_private_file, private_directory, warn_untrusted
from .stencil import grid_masks

__all__ = ["enabled", "library", "chebyshev_basis", "chebyshev_adjoint", "series_forward", "series_backward"]

_LOCK = threading.Lock()
_LIBRARIES: dict = {}
_PROC_FD = os.path.isdir("/proc/self/fd")
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])


def enabled() -> bool:
    """False where SCM_OPS_CPU_KERNELS=0: the PyTorch loops run."""
    return os.environ.get("SCM_OPS_CPU_KERNELS", "1") != "0"


_SIGNATURES = {   # argument types: i = int64, p = pointer, d = double, t = int (threads)
    "chebyshev_basis": "iiippppdpiippt",
    "chebyshev_adjoint": "iiipppddpiipppppppt",
    "stencil_series_forward": "iiippppdiippt",
    "stencil_series_backward": "iiipppdiiipppppt",
}
_TYPES = {"i": ctypes.c_int64, "p": ctypes.c_void_p, "d": ctypes.c_double, "t": ctypes.c_int}


def _cpu_tag() -> str:
    """What -march=native compiles for: the machine, its CPU model and feature flags."""
    tag = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [line for line in fh if line.startswith(("model name", "flags", "Features"))]
        tag += "".join(sorted(set(lines)))
    except OSError:
        tag += platform.processor()
    return tag


def _cache_dir() -> Optional[pathlib.Path]:
    root = cache_root()
    return root / "cpu" if root is not None else None


def _private_cache_dir() -> Optional[pathlib.Path]:
    """The kernels' cache directory, created private (scm_ops/cache.py); None where it is
    refused (with a warning naming it) or cannot be created: the kernels are then built for
    this process only."""
    path = _cache_dir()
    if path is None:
        return None
    try:
        return private_directory(path)
    except UntrustedCacheError as err:
        warn_untrusted(err, "the CPU kernels are built for this process only")
    except OSError:                                   # a read-only or full home
        pass
    return None


def _elf_complete(fd: int) -> bool:
    """False for a 64-bit little-endian ELF file cut short (a killed build or copy): the loader
    would map its missing end and fault on first use. Other formats are left to the loader."""
    header = os.pread(fd, 64, 0)
    if len(header) < 64 or header[:6] != b"\x7fELF\x02\x01":
        return header[:4] != b"\x7fELF"
    phoff, shoff = struct.unpack_from("<QQ", header, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", header, 54)
    end = shoff + shnum * shentsize
    table = os.pread(fd, phnum * phentsize, phoff)
    if len(table) < phnum * phentsize:
        return False
    for i in range(phnum):
        offset, _, _, filesz = struct.unpack_from("<QQQQ", table, i * phentsize + 8)
        end = max(end, offset + filesz)
    return os.fstat(fd).st_size >= end


def _load(path: pathlib.Path) -> Optional[ctypes.CDLL]:
    """The library at `path` with its functions typed, loaded from the file as checked by
    open_private_file (raises UntrustedCacheError); None where it is missing or not a complete
    library (a killed build, another file): the caller builds it again."""
    try:
        fd = open_private_file(path)
    except FileNotFoundError:
        return None
    try:
        if not _elf_complete(fd):
            return None
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}" if _PROC_FD else str(path))   # the checked file itself
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        for function, signature in _SIGNATURES.items():
            getattr(lib, function).argtypes = [_TYPES[c] for c in signature]
            getattr(lib, function).restype = ctypes.c_int
    except AttributeError:
        return None
    return lib


def _compile(name: str, source: str, compiler: str, flags, target: Optional[pathlib.Path]):
    """(library, None) or (None, the compiler's last error line). Built in a private temporary
    directory: inside the cache beside `target`, then renamed onto it (atomic: processes
    building at once each load a complete file) and loaded from there; with no target, loaded
    from the temporary directory, which is then removed (the loaded library stays mapped).
    Raises OSError where the directory is not writable."""
    with tempfile.TemporaryDirectory(dir=target.parent if target else None, prefix=".build-") as tmp:
        src, out = pathlib.Path(tmp) / f"{name}.c", pathlib.Path(tmp) / f"{name}.so"
        src.write_text(source)
        run = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(src), "-o", str(out)],
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            return None, (run.stderr.strip().splitlines() or [""])[-1]
        os.chmod(out, 0o700)
        if target is not None:
            os.replace(out, target)
        lib = _load(target or out)
        return (lib, None) if lib is not None else (None, "the built library did not load")


def _build(name: str) -> Optional[ctypes.CDLL]:
    source = importlib.resources.files("scm_ops.kernels.structured").joinpath(f"{name}.c").read_text()
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        _warn(name, compiler, f"it does not run: {err}")
        return None
    directory = _private_cache_dir()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\0".join([source, compiler, version, " ".join(flags), _cpu_tag()]).encode()).hexdigest()
        target = directory / f"{name}-{key[:24]}.so" if directory is not None else None
        if target is not None:
            try:
                lib = _load(target)
            except UntrustedCacheError as err:          # rebuilt and renamed over it
                warn_untrusted(err, "building the CPU kernels again")
                lib = None
            if lib is not None:
                return lib
        try:
            try:
                lib, error = _compile(name, source, compiler, flags, target)
            except OSError:
                if target is None:
                    raise
                lib, error = _compile(name, source, compiler, flags, None)   # the cache is not writable
        except (OSError, subprocess.SubprocessError) as err:
            lib, error = None, str(err)
        if lib is not None:
            return lib
        errors.append(error)                           # these flags fail: try the next set
    _warn(name, compiler, errors[-1] if errors else "")
    return None


def _warn(name: str, compiler: str, why: str) -> None:
    warnings.warn(f"scm_ops: the CPU kernels {name}.c did not build with the C compiler {compiler!r} ({why}); the "
                  "structured path runs its PyTorch loops instead (the same results, slower). Set CC to a C "
                  "compiler, or SCM_OPS_CPU_KERNELS=0 to silence this.", RuntimeWarning, stacklevel=4)


def library(name: str = "cpu") -> Optional[ctypes.CDLL]:
    """The compiled kernels of kernels/structured/<name>.c, built once per process (and per
    machine, on disk); None where they cannot be built or SCM_OPS_CPU_KERNELS=0."""
    if not enabled():
        return None
    with _LOCK:
        if name not in _LIBRARIES:
            _LIBRARIES[name] = _build(name)
        return _LIBRARIES[name]


def _flat(w: torch.Tensor, offsets):
    """(planes [K, B N] float64 contiguous, zero where a neighbour leaves the grid, as the
    kernels require; flat shifts [K] int64; the grid mask [K, H, W] float64) of w [B, K, H, W]."""
    B, K, H, W = w.shape
    valid, _ = grid_masks(H, W, 2 * K, torch.float64, w.device)
    planes = (w.double() * valid).transpose(0, 1).reshape(K, B * H * W).contiguous()
    return planes, torch.tensor([dr * W + dc for dr, dc in offsets], dtype=torch.int64), valid


def _f64(*tensors):
    return tuple(t.double().contiguous() for t in tensors)


def _gradient_of_w(pairs: torch.Tensor, valid: torch.Tensor, shape) -> torch.Tensor:
    """The pair sums the kernels write, [K, B N], as the gradient of w [B, K, H, W]: zero where a
    neighbour leaves the grid (the kernels read pairs across a row end there)."""
    B, H, W = shape
    return pairs.reshape(valid.shape[0], B, H, W).transpose(0, 1) * valid


def _check(failed: int) -> None:
    if failed:
        raise MemoryError(f"a CPU series kernel could not allocate the working rows of {failed} images")


def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def chebyshev_basis(lib, f: torch.Tensor, w: torch.Tensor, d: torch.Tensor, offsets, scale: float,
                    coef: torch.Tensor, degree: int, keep: bool):
    """The forward basis of the Chebyshev series (chebyshev._basis) in C: (phi(Z) F [B N], the
    basis [degree + 1, B N] or None), float64. f, d [B, H, W], w [B, K, H, W] on the CPU;
    coef [ncoef]; degree >= 1."""
    B, H, W = f.shape
    cells = B * H * W
    planes, shifts, _ = _flat(w, offsets)
    f, d, coef = _f64(f, d, coef)
    basis = f.new_empty(degree + 1, cells) if keep else None
    phi_f = f.new_empty(cells)
    _check(lib.chebyshev_basis(B, H * W, len(offsets), _ptr(shifts), _ptr(f), _ptr(d), _ptr(planes), float(scale),
                               _ptr(coef), coef.shape[0], degree, _ptr(basis), _ptr(phi_f), torch.get_num_threads()))
    return phi_f, basis


def chebyshev_adjoint(lib, grad_u: torch.Tensor, lg: torch.Tensor, w: torch.Tensor, d: torch.Tensor, offsets,
                      scale: float, radius: float, coef: torch.Tensor, basis: torch.Tensor, phi_f: torch.Tensor):
    """The backward of the Chebyshev series (chebyshev._adjoint_sweep, and the g (phi(Z) F)^T
    term) in C: (dF [B, H, W], dw [B, K, H, W], dd [B, H, W]), float64. grad_u, d [B, H, W],
    w [B, K, H, W], lg = L g and phi_f [B N], coef [degree + 1, S], basis [degree + 1, B N],
    on the CPU; degree >= 1."""
    B, H, W = grad_u.shape
    K, cells = len(offsets), B * H * W
    planes, shifts, valid = _flat(w, offsets)
    g, lg, d, coef, basis, phi_f = _f64(grad_u, lg, d, coef, basis, phi_f)
    grad_f, pairs, diag = g.new_empty(cells), g.new_empty(K, cells), g.new_empty(cells)
    _check(lib.chebyshev_adjoint(B, H * W, K, _ptr(shifts), _ptr(d), _ptr(planes), float(scale), float(radius),
                                 _ptr(coef), coef.shape[1], coef.shape[0] - 1, _ptr(basis), _ptr(g), _ptr(lg),
                                 _ptr(phi_f), _ptr(grad_f), _ptr(pairs), _ptr(diag), torch.get_num_threads()))
    return grad_f.reshape(B, H, W), _gradient_of_w(pairs, valid, (B, H, W)), diag.reshape(B, H, W)


def series_forward(lib, f: torch.Tensor, w: torch.Tensor, d: torch.Tensor, offsets, alpha: float, steps: int,
                   rows: int):
    """The matrix-free series (series._series_fwd_torch) in C: (u [B, H, W], q [steps, rows, B N]
    with q_j = (-x_j, alpha r_j)[:rows]), computed in float64, returned in f's dtype. f, d
    [B, H, W], w [B, K, H, W] on the CPU."""
    B, H, W = f.shape
    cells = B * H * W
    planes, shifts, _ = _flat(w, offsets)
    f64, d = _f64(f, d)
    u, q = torch.empty_like(f64), f64.new_empty(steps, rows, cells)
    _check(lib.stencil_series_forward(B, H * W, len(offsets), _ptr(shifts), _ptr(f64), _ptr(d), _ptr(planes),
                                      float(alpha), steps, rows, _ptr(u), _ptr(q), torch.get_num_threads()))
    return u.to(f.dtype), q.to(f.dtype)


def series_backward(lib, grad_u: torch.Tensor, w: torch.Tensor, d: torch.Tensor, q: torch.Tensor, offsets,
                    alpha: float, rows: int):
    """Its backward (series._series_bwd_torch) in C: (dF [B, H, W], dw [B, K, H, W], dd [B, H, W])
    in the dtypes of grad_u, w and d; q [steps, >= rows, B N] from series_forward, rows 2 for
    the exact gradient, 1 for the published one."""
    B, H, W = grad_u.shape
    K, cells = len(offsets), B * H * W
    planes, shifts, valid = _flat(w, offsets)
    g, d64, q = _f64(grad_u, d, q)
    grad_f, pairs, diag = g.new_empty(cells), g.new_empty(K, cells), g.new_empty(cells)
    _check(lib.stencil_series_backward(B, H * W, K, _ptr(shifts), _ptr(d64), _ptr(planes), float(alpha), q.shape[0],
                                       rows, q.shape[1], _ptr(q), _ptr(g), _ptr(grad_f), _ptr(pairs), _ptr(diag),
                                       torch.get_num_threads()))
    return (grad_f.reshape(B, H, W).to(grad_u.dtype), _gradient_of_w(pairs, valid, (B, H, W)).to(w.dtype),
            diag.reshape(B, H, W).to(d.dtype))
