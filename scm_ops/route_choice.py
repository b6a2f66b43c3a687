"""The route of each block of ActivationDiffusion's structured path: blocks with 2^p <=
MATRIX_FREE_MAX_STEPS steps take the matrix-free series, the others (the p = 16 block) one
of LARGE_P_ROUTES, measured on the GPU. Of scm_ops it imports _common only: the stack
(scm_ops/diffusion.py) calls it, and it runs the stack through the object it is given.

With ``large_p_route=None`` a call of the stack asks ``choose_large_p_route`` at forward
time. In order of precedence:

1. ``SCM_OPS_LARGE_P_ROUTE=chebyshev|spectral|newton_schulz`` pins the route for every
   call without an argument (the ``large_p_route=`` argument pins it per module or call and
   is read before this function is called).
2. ``SCM_OPS_ROUTE_TUNING=0``: the static default, ``static_large_p_route`` (the Chebyshev
   series; the spectral form for float64 on grids up to FLOAT64_SPECTRAL_MAX_CELLS).
   Those float64 grids always take the static default: it is chosen for exactness there.
3. A choice measured earlier for the same configuration (``config_key``: device name and
   compute capability, grid, connectivity, compute dtype, gradient semantics, whether a
   backward is timed, backend, iterations, alpha and the torch, triton and scm_ops
   versions) and batch-size bucket (the next power of two), from memory or from the cache
   file ``$SCM_OPS_CACHE_DIR/routes.json`` (default ``~/.cache/scm_ops/routes.json``).
4. On CUDA tensors (``should_tune``), outside a traced graph: each candidate route is
   timed on the call's own semantic maps, lam and beta (forward, and backward where the
   call computes gradients, of the whole stack with that route pinned; ``route_timer``
   times it), the fastest is kept in memory and in the cache file, and the timings are
   logged at debug level on the "scm_ops" logger. The call that measures then runs the
   chosen route as any later call does: its result is the pinned route's result.
5. Otherwise (CPU tensors, a cache miss inside torch.compile): the static default.

Inside torch.compile nothing is timed: the cache is read once while the graph is traced
(``torch.compiler.assume_constant_result``, no graph break). The batch size is symbolic
there, so the entry of the largest batch bucket measured for the configuration is used.

The functions below take ``module``: an ActivationDiffusion, or any object with its
attributes grid_size, iterations, alpha, connectivity, exact_gradients, backend,
large_p_route, lam and beta and a ``forward(attention, semantic)`` that runs the stack
(``scm_ops.activation_diffusion`` passes one of its own); a measurement runs a shallow copy
of it with ``large_p_route`` pinned.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import pathlib
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import torch

from ._common import resolve_backend
from .cache import UntrustedCacheError, cache_root, private_directory, read_private_text, warn_untrusted

__all__ = ["choose_large_p_route", "static_large_p_route", "default_large_p_route", "explain_large_p_route",
           "should_tune", "tuning_enabled", "pinned_route", "cache_path", "config_key", "batch_bucket",
           "candidate_routes", "synchronized_timer", "route_timer", "clear_memory_cache", "LARGE_P_ROUTES",
           "MATRIX_FREE_MAX_STEPS", "FLOAT64_SPECTRAL_MAX_CELLS", "DENSE_CANDIDATE_MAX_CELLS", "CACHE_FORMAT"]

logger = logging.getLogger("scm_ops")

# Blocks with 2^p <= this many matrix-free steps take StencilSeries; the others take the
# route of LARGE_P_ROUTES for the device (see the README for the timings behind the choice).
MATRIX_FREE_MAX_STEPS = 64
LARGE_P_ROUTES = ("chebyshev", "spectral", "newton_schulz")
# float64 inputs on grids up to this many cells take the spectral form by default
# (static_large_p_route).
FLOAT64_SPECTRAL_MAX_CELLS = 1024

ROUTE_ENV = "SCM_OPS_LARGE_P_ROUTE"
TUNING_ENV = "SCM_OPS_ROUTE_TUNING"
CACHE_FILE = "routes.json"
CACHE_FORMAT = 1

# The dense routes (spectral: eigh, O(N^3); newton_schulz: 2p N x N iterates) are timed only
# on grids up to this many cells: above it they are far slower than the series and their
# measurement alone could take minutes or exhaust the GPU's memory.
DENSE_CANDIDATE_MAX_CELLS = 1024
# newton_schulz is timed only if its iterates fit in this fraction of the free GPU memory.
DENSE_MEMORY_FRACTION = 0.5

# Timing: calls before the timed ones (Triton compiles its kernels, the series caches its
# coefficients), then the fastest of REPEATS synchronised calls.
WARMUP = 1
REPEATS = 3


# -- switches -----------------------------------------------------------------------------------

def pinned_route() -> Optional[str]:
    """The route SCM_OPS_LARGE_P_ROUTE pins, or None when it is unset or empty; ValueError
    naming the variable for any other value."""
    route = os.environ.get(ROUTE_ENV) or None
    if route is not None and route not in LARGE_P_ROUTES:
        raise ValueError(f"{ROUTE_ENV} must be one of {LARGE_P_ROUTES} or unset, got {route!r}")
    return route


def tuning_enabled() -> bool:
    """False when SCM_OPS_ROUTE_TUNING=0: no measuring and no cached choice, the static default."""
    return os.environ.get(TUNING_ENV, "1") != "0"


def should_tune(semantic: torch.Tensor) -> bool:
    """Whether a cache miss for `semantic` [B, C, H, W] is measured (outside a traced graph):
    CUDA tensors only, and not while a CUDA graph is being captured (a synchronisation would
    break the capture). Other devices take the static default."""
    return semantic.is_cuda and not torch.cuda.is_current_stream_capturing()


def _float64_exact(module, semantic: torch.Tensor) -> bool:
    H, W = module.grid_size
    return semantic.dtype == torch.float64 and H * W <= FLOAT64_SPECTRAL_MAX_CELLS


def default_large_p_route(device: torch.device, grid_size=None) -> str:
    """The static route of blocks with 2^p > MATRIX_FREE_MAX_STEPS on `device` for an (H, W)
    grid: the Chebyshev series, on every device and grid; what runs without a measurement,
    and the first candidate of one (it wins ties). CPU: faster than the spectral form at
    14 x 14 (B = 64), 28 x 28 (B = 16) and 56 x 56 (B = 4), C = 200, on every input family
    (docs/structured.md, "Choosing a route"); its cost grows as N, the others' as N^3. GPU:
    on the Triton backend one program per image runs each pass of the series (up to
    chebyshev_max_cells), keeping O(N) per image where dense Newton-Schulz keeps 2p N x N
    iterates. `grid_size` is accepted for a rule that depends on the grid."""
    return "chebyshev"


def static_large_p_route(module, semantic: torch.Tensor) -> str:
    """The route without a measurement: float64 inputs on grids up to
    FLOAT64_SPECTRAL_MAX_CELLS take the spectral form, exact up to rounding (~1e-15), where
    the series stops at its float64 truncation tolerance (~1e-11 relative at the block);
    the others default_large_p_route(device, grid). `module` an ActivationDiffusion,
    `semantic` [B, C, H, W] in the compute dtype."""
    if _float64_exact(module, semantic):
        return "spectral"
    return default_large_p_route(semantic.device, module.grid_size)


# -- keys ---------------------------------------------------------------------------------------

def batch_bucket(batch: int) -> int:
    """The next power of two >= batch (1 for batch <= 1)."""
    return 1 << max(0, int(batch) - 1).bit_length()


_device_descriptions: dict = {}


def _device_description(device_type: str, device_index: Optional[int]) -> str:
    """The text "<name> sm_<major><minor>" for a CUDA device, the device type for others."""
    if device_type != "cuda":
        return device_type
    index = torch.cuda.current_device() if device_index is None else device_index
    if index not in _device_descriptions:
        major, minor = torch.cuda.get_device_capability(index)
        _device_descriptions[index] = f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"
    return _device_descriptions[index]


_versions_text: Optional[str] = None


def _versions() -> str:
    global _versions_text
    if _versions_text is None:
        import importlib.metadata
        try:
            triton_version = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            triton_version = "none"
        # the package is imported before any of its modules: read, not imported (no cycle)
        version = getattr(sys.modules.get(__package__), "__version__", "unknown")
        _versions_text = f"torch {torch.__version__}, triton {triton_version}, scm_ops {version}"
    return _versions_text


def config_key(device_type: str, device_index: Optional[int], grid, connectivity: int, dtype: torch.dtype,
               exact_gradients: bool, backward: bool, backend: str, iterations, alpha: float) -> str:
    """The cache key of a configuration, without the batch size: device name and compute
    capability (the device type off CUDA), grid (H, W), connectivity, compute dtype, gradient
    semantics, whether the backward is timed, backend, iterations, alpha and versions. A
    readable string, e.g. "NVIDIA H100 80GB HBM3 sm_90 | 14x14 | 4 neighbours | float32 |
    published gradients | forward+backward | triton | iterations (16, 4, 4, 4) | alpha 0.002 |
    torch 2.13.0, triton 3.9.0, scm_ops 0.1.0"."""
    return " | ".join([
        _device_description(device_type, device_index), f"{grid[0]}x{grid[1]}", f"{connectivity} neighbours",
        str(dtype).replace("torch.", ""), "exact gradients" if exact_gradients else "published gradients",
        "forward+backward" if backward else "forward", backend, f"iterations {tuple(iterations)}",
        f"alpha {alpha!r}", _versions()])


def _config_fields(module, semantic: torch.Tensor) -> tuple:
    """The arguments of config_key for a call of the stack: Python constants, also under torch.compile."""
    device = semantic.device
    backward = torch.is_grad_enabled() and (semantic.requires_grad or module.lam.requires_grad
                                            or module.beta.requires_grad)
    return (device.type, device.index, tuple(module.grid_size), module.connectivity, semantic.dtype,
            module.exact_gradients, backward, resolve_backend(module.backend, semantic), tuple(module.iterations),
            module.alpha)


# -- the cache: memory and file -----------------------------------------------------------------

# {config key: {str(batch bucket): {"route": str, "ms": {route: float}, "failed": {route: str}, "batch": int}}}
_memory: dict = {}
_memory_path: object = ()      # the file _memory was loaded from (() before the first load)
_lock = threading.Lock()


def cache_path() -> Optional[pathlib.Path]:
    """$SCM_OPS_CACHE_DIR/routes.json, else ~/.cache/scm_ops/routes.json; None without a
    home directory. Read only when this user owns it and nobody else can write it
    (scm_ops/cache.py): a foreign file is ignored with a warning, its routes measured again."""
    root = cache_root()
    return None if root is None else root / CACHE_FILE


def _valid_entry(entry) -> bool:
    return isinstance(entry, dict) and entry.get("route") in LARGE_P_ROUTES


def _read(path: Optional[pathlib.Path]) -> dict:
    """The entries of a cache file; {} for a missing, unreadable or malformed file (logged at
    debug level) or one another user could have written (a warning naming it), and without
    the malformed entries of a readable one."""
    if path is None:
        return {}
    try:
        data = json.loads(read_private_text(path))
    except FileNotFoundError:
        return {}
    except UntrustedCacheError as err:
        warn_untrusted(err, "its routes are not used")
        return {}
    except (OSError, ValueError) as err:
        logger.debug("ignoring the route cache %s: %s", path, err)
        return {}
    routes = data.get("routes") if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
    if not isinstance(routes, dict):
        logger.debug("ignoring the route cache %s: not a format-%d route cache", path, CACHE_FORMAT)
        return {}
    return {key: {bucket: entry for bucket, entry in buckets.items() if _valid_entry(entry)}
            for key, buckets in routes.items() if isinstance(buckets, dict)}


def _write(path: Optional[pathlib.Path], key: str, bucket: str, entry: dict) -> None:
    """Add one entry to the cache file: read it again (other processes may have written),
    merge, write a temporary file (mode 0600) in the same private folder and rename it over
    the file (atomic). A failure is logged at debug level, a folder another user could write
    is refused with a warning; the choice stays in memory."""
    if path is None:
        return
    tmp = None
    try:
        private_directory(path.parent)
        routes = _read(path)
        routes.setdefault(key, {})[bucket] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".routes-", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"format": CACHE_FORMAT, "routes": routes}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except UntrustedCacheError as err:
        warn_untrusted(err, "the route is kept in memory only")
    except OSError as err:
        logger.debug("could not write the route cache %s: %s", path, err)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _entries() -> dict:
    """The in-memory cache, loaded from the cache file at first use (and again when
    SCM_OPS_CACHE_DIR points somewhere else). Call with _lock held."""
    global _memory, _memory_path
    path = cache_path()
    if path != _memory_path:
        _memory, _memory_path = _read(path), path
    return _memory


def clear_memory_cache() -> None:
    """Forget the in-memory cache; the next lookup reads the cache file again."""
    global _memory, _memory_path
    with _lock:
        _memory, _memory_path = {}, ()


def _lookup(key: str, bucket: Optional[int]) -> Optional[dict]:
    """The entry of `key` for the batch bucket, or with bucket None the entry of the largest
    bucket measured; None if there is none."""
    with _lock:
        buckets = _entries().get(key) or {}
        if bucket is not None:
            return buckets.get(str(bucket))
        sizes = [b for b in buckets if b.isdigit()]
        return buckets[max(sizes, key=int)] if sizes else None


def _store(key: str, bucket: int, entry: dict, persist: bool = True) -> None:
    with _lock:
        _entries().setdefault(key, {})[str(bucket)] = entry
        path = _memory_path
    if persist:
        _write(path, key, str(bucket), entry)


@torch.compiler.assume_constant_result
def _cached_route_while_compiling(*fields) -> str:
    """The cached route of a configuration ("" if none), for a graph being traced: run once
    at trace time as plain Python, its result a constant of the graph."""
    try:
        entry = _lookup(config_key(*fields), None)
    except Exception as err:  # noqa: BLE001 - a cache problem must not break tracing
        logger.debug("no cached route while compiling: %s", err)
        return ""
    return entry["route"] if entry is not None else ""


# -- measuring ----------------------------------------------------------------------------------

def synchronized_timer(route: str, run: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of `run`: WARMUP calls, then the fastest of REPEATS, each ended by
    torch.cuda.synchronize on CUDA. `route` names what runs (unused here)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(WARMUP):
        run()
    sync()
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


# The timer measure_routes uses when none is passed: route_timer(route, run, device) ->
# seconds, where run() does one forward (and backward) of the stack with that route.
route_timer: Callable[[str, Callable[[], None], torch.device], float] = synchronized_timer


def candidate_routes(module, semantic: torch.Tensor, static: str, backward: bool = True) -> tuple[str, ...]:
    """The routes worth timing for `semantic` [B, C, H, W], the static default first (it wins
    ties): every route of LARGE_P_ROUTES, except the dense ones on grids over
    DENSE_CANDIDATE_MAX_CELLS, and newton_schulz where its iterates would take more than
    DENSE_MEMORY_FRACTION of the free GPU memory."""
    B = semantic.shape[0]
    H, W = module.grid_size
    cells = H * W
    routes = [static] + [r for r in LARGE_P_ROUTES if r != static]
    if cells > DENSE_CANDIDATE_MAX_CELLS:
        return tuple(r for r in routes if r == "chebyshev") or (static,)
    if "newton_schulz" in routes and semantic.is_cuda:
        p = max((p for p in module.iterations if 2 ** p > MATRIX_FREE_MAX_STEPS), default=0)
        matrices = 2 * p + 4 if backward else 4
        needed = B * cells * cells * semantic.element_size() * matrices
        try:
            free = torch.cuda.mem_get_info(semantic.device)[0]
        except RuntimeError:
            free = None
        if free is not None and needed > DENSE_MEMORY_FRACTION * free and static != "newton_schulz":
            routes.remove("newton_schulz")
    return tuple(routes)


def _runner(module, route: str, semantic: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One call of the whole stack with `route` pinned, on the call's semantic maps (a
    detached copy), lam and beta, and a uniform F0 (F0 changes no route's cost: the series'
    degree follows the bound R of L, from S and lam). With `backward`, gradients to F0, S0,
    lam and beta by torch.autograd.grad: nothing is accumulated into .grad."""
    pinned = copy.copy(module)          # shallow: the same parameters, its own large_p_route
    pinned.large_p_route = route
    B, _, H, W = semantic.shape
    f = torch.ones(B, H, W, dtype=semantic.dtype, device=semantic.device)
    s = semantic.detach()
    if not backward:
        def run():
            with torch.no_grad():
                pinned.forward(f, s)
        return run
    f, s = f.requires_grad_(), s.clone().requires_grad_()
    inputs = [f, s] + [p for p in (module.lam, module.beta) if p.requires_grad]

    def run():
        # saved tensors kept as they are, whatever hooks the caller's region set (activation
        # checkpointing, offloading): the timing's graph is its own
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            out_f, out_s = pinned.forward(f, s)
            torch.autograd.grad(out_f.sum() + out_s.sum(), inputs)
    return run


def _keep(tensor):
    return tensor


def measure_routes(module, semantic: torch.Tensor, backward: bool, static: str,
                   timer: Optional[Callable] = None) -> tuple[dict, dict]:
    """Time each of candidate_routes; returns ({route: seconds}, {route: error text}) with a
    route that raised (out of memory, say) in the second dict only."""
    timer = route_timer if timer is None else timer
    seconds, failed = {}, {}
    for route in candidate_routes(module, semantic, static, backward):
        out_of_memory = False
        try:
            seconds[route] = float(timer(route, _runner(module, route, semantic, backward), semantic.device))
        except Exception as err:  # noqa: BLE001 - a route that cannot run here is not chosen
            text = str(err).strip()
            failed[route] = type(err).__name__ + (f": {text.splitlines()[0]}" if text else "")
            out_of_memory = isinstance(err, torch.cuda.OutOfMemoryError)
        if out_of_memory:               # here the failed run's tensors are released
            torch.cuda.empty_cache()
    return seconds, failed


def _format_timings(entry: dict) -> str:
    parts = [f"{r} {ms:.3f} ms" for r, ms in entry.get("ms", {}).items()]
    parts += [f"{r} failed ({why})" for r, why in entry.get("failed", {}).items()]
    return ", ".join(parts)


# -- the choice ---------------------------------------------------------------------------------

def choose_large_p_route(module, semantic: torch.Tensor, timer: Optional[Callable] = None) -> str:
    """The route of `module`'s large-p blocks for this call (module docstring, in its order):
    `module` an ActivationDiffusion (or the like, module docstring) with large_p_route=None,
    `semantic` [B, C, H, W] (B >= 1) in the compute dtype (float32 or float64), on the
    device of its lam. `timer` replaces
    route_timer (seconds of one call; see synchronized_timer). Returns one of LARGE_P_ROUTES."""
    pinned = pinned_route()
    if pinned is not None:
        return pinned
    static = static_large_p_route(module, semantic)
    if not tuning_enabled() or _float64_exact(module, semantic):
        return static
    fields = _config_fields(module, semantic)
    if torch.compiler.is_compiling():
        return _cached_route_while_compiling(*fields) or static
    key, bucket = config_key(*fields), batch_bucket(semantic.shape[0])
    entry = _lookup(key, bucket)
    if entry is not None:
        return entry["route"]
    if not should_tune(semantic):
        return static
    seconds, failed = measure_routes(module, semantic, fields[6], static, timer)
    if not seconds:
        # kept in memory only: this process does not measure it again, a later one may
        _store(key, bucket, {"route": static, "failed": failed, "batch": int(semantic.shape[0])}, persist=False)
        logger.debug("large-p route for %s, batch %d: every route failed (%s); %s, not written to the cache file",
                     key, semantic.shape[0], _format_timings({"failed": failed}), static)
        return static
    best = min(seconds, key=seconds.get)    # the first of equals: the static default
    entry = {"route": best, "ms": {r: round(1e3 * t, 4) for r, t in seconds.items()}, "batch": int(semantic.shape[0])}
    if failed:
        entry["failed"] = failed
    _store(key, bucket, entry)
    logger.debug("large-p route for %s, batch %d (bucket %d): %s -> %s", key, semantic.shape[0], bucket,
                 _format_timings(entry), best)
    return best


def explain_large_p_route(module, semantic: torch.Tensor) -> str:
    """The route a call of `module` with `semantic` [B, C, H, W] (compute dtype) takes, and
    why, without measuring: e.g. "chebyshev (measured: chebyshev 1.2 ms, spectral 3.4 ms,
    newton_schulz 9.1 ms; cache /root/.cache/scm_ops/routes.json)"."""
    if module.large_p_route is not None:
        return f"{module.large_p_route} (large_p_route argument)"
    pinned = pinned_route()
    if pinned is not None:
        return f"{pinned} (pinned by {ROUTE_ENV})"
    static = static_large_p_route(module, semantic)
    if not tuning_enabled():
        return f"{static} (static default: {TUNING_ENV}=0)"
    if _float64_exact(module, semantic):
        return f"{static} (static default for float64 up to {FLOAT64_SPECTRAL_MAX_CELLS} cells)"
    key, bucket = config_key(*_config_fields(module, semantic)), batch_bucket(semantic.shape[0])
    entry = _lookup(key, bucket)
    if entry is not None and not entry.get("ms"):
        return f"{entry['route']} (static default: no route could be timed: {_format_timings(entry)})"
    if entry is not None:
        return f"{entry['route']} (measured: {_format_timings(entry)}; cache {cache_path()})"
    where = "not measured yet" if should_tune(semantic) else f"not measured on {semantic.device.type}"
    return f"{static} (static default: {where})"
