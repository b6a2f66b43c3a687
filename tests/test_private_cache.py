"""The on-disk cache is never a way into the process (scm_ops/cache.py, scm_ops/structured/cpu.py):
directories are created private, a library or file another user owns or can write is refused
with a warning naming it and never loaded, the CPU kernels still run (built for the process
where no private cache works), a truncated library is rebuilt, and processes building at once
each load a complete library. Also: the source tree runs from a clone's root."""
import ctypes
import importlib
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from scm_ops import cache
from scm_ops.structured import chebyshev, cpu
from scm_ops.structured.stencil import OFFSETS
from scm_ops.testing import random_stencil

REPO = pathlib.Path(__file__).resolve().parents[1]
HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="giving a file to another user needs root")
OTHER_UID = 4242

# A library another user could plant under the cached name: the kernels' symbols, each
# "succeeding" without writing its outputs, and a constructor that leaves a marker file.
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("SCM_OPS_PLANTED_MARKER");
    FILE *fh = path ? fopen(path, "w") : NULL;
    if (fh) { fputs("ran", fh); fclose(fh); }
}
int chebyshev_basis(void) { return 0; }
int chebyshev_adjoint(void) { return 0; }
int stencil_series_forward(void) { return 0; }
int stencil_series_backward(void) { return 0; }
"""


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No library loaded yet in this process, the cache under tmp_path, a marker path."""
    monkeypatch.setattr(cpu, "_LIBRARIES", {})
    monkeypatch.setenv("SCM_OPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SCM_OPS_CPU_KERNELS", "1")
    marker = tmp_path / "planted-ran"
    monkeypatch.setenv("SCM_OPS_PLANTED_MARKER", str(marker))
    return marker


@pytest.fixture(scope="module")
def built_library(tmp_path_factory) -> pathlib.Path:
    """This machine's build, made once in a scratch cache by another process: its file name is
    the one a planted library must take."""
    scratch = tmp_path_factory.mktemp("scratch")
    env = dict(os.environ, SCM_OPS_CACHE_DIR=str(scratch))
    subprocess.run([sys.executable, "-c", "from scm_ops.structured import cpu; assert cpu.library()"],
                   env=env, check=True, timeout=300)
    (path,) = (scratch / "cpu").glob("cpu-*.so")
    return path


def _plant(path: pathlib.Path, tmp_path) -> None:
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", str(src), "-o", str(path)], check=True)


def _assert_kernels_run_right() -> None:
    """The C kernels are loaded (not the fallback) and give the PyTorch loops' result."""
    assert cpu.library() is not None
    w, d = random_stencil(2, 4, torch.float64, "cpu", grid=(4, 5))
    f = torch.rand(2, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        u = chebyshev.ChebyshevFilter.apply(f, w, d, 0.002, 16, OFFSETS[4], False)
        os.environ["SCM_OPS_CPU_KERNELS"] = "0"
        try:
            reference = chebyshev.ChebyshevFilter.apply(f, w, d, 0.002, 16, OFFSETS[4], False)
        finally:
            os.environ["SCM_OPS_CPU_KERNELS"] = "1"
    torch.testing.assert_close(u, reference, rtol=1e-12, atol=1e-12)


# -- scm_ops/cache.py ----------------------------------------------------------------------------

def test_directories_are_created_private(tmp_path):
    path = cache.private_directory(tmp_path / "a" / "b" / "c")
    for level in (tmp_path / "a", tmp_path / "a" / "b", path):
        assert stat.S_IMODE(os.stat(level).st_mode) == 0o700, level


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_directory_others_can_write_is_refused(tmp_path, mode):
    path = tmp_path / "shared"
    path.mkdir()
    os.chmod(path, mode)
    with pytest.raises(cache.UntrustedCacheError, match=f"{path}.*writable by its group or by others"):
        cache.private_directory(path)
    (path / "f").write_text("{}")
    with pytest.raises(cache.UntrustedCacheError, match=str(path)):
        cache.read_private_text(path / "f")


def test_symbolic_links(tmp_path):
    """A linked cache directory is judged by the directory it leads to; a linked file is refused."""
    real = cache.private_directory(tmp_path / "real")
    (real / "f").write_text("x")
    os.symlink(real, tmp_path / "link")
    os.symlink(real / "f", real / "g")
    assert cache.private_directory(tmp_path / "link") == tmp_path / "link"
    assert cache.read_private_text(tmp_path / "link" / "f") == "x"
    with pytest.raises(cache.UntrustedCacheError, match="symbolic link"):
        cache.read_private_text(real / "g")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    os.symlink(shared, tmp_path / "link-to-shared")
    with pytest.raises(cache.UntrustedCacheError, match="writable by its group or by others"):
        cache.private_directory(tmp_path / "link-to-shared")


def test_a_file_where_the_directory_should_be_is_not_used(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        cache.private_directory(tmp_path / "f")


def test_a_file_others_can_write_is_refused(tmp_path):
    directory = cache.private_directory(tmp_path / "c")
    (directory / "f").write_text("x")
    os.chmod(directory / "f", 0o666)
    with pytest.raises(cache.UntrustedCacheError, match=f"file {directory / 'f'} is writable"):
        cache.read_private_text(directory / "f")
    with pytest.raises(FileNotFoundError):
        cache.read_private_text(directory / "missing")


def test_another_owner_is_refused(tmp_path, monkeypatch):
    """Seen from another user id (euid changed), this user's own directory and file are foreign."""
    directory = cache.private_directory(tmp_path / "c")
    (directory / "f").write_text("x")
    monkeypatch.setattr(cache.os, "geteuid", lambda: os.stat(directory).st_uid + 1)
    with pytest.raises(cache.UntrustedCacheError, match=f"{directory}.* is owned by user id"):
        cache.private_directory(directory)
    with pytest.raises(cache.UntrustedCacheError, match="is owned by user id"):
        cache.read_private_text(directory / "f")


# -- the CPU kernels' cache -----------------------------------------------------------------------

@needs_compiler
@pytest.mark.parametrize("where", ["world_writable_dir", "group_writable_file"])
def test_a_planted_library_is_never_loaded(fresh, tmp_path, built_library, where):
    """A library at the exact cached name, in a cache directory anyone can write or as a file
    its group can write: refused with a warning naming it; the kernels are built and run right."""
    name = built_library.name
    directory = tmp_path / "cache" / "cpu"
    _plant(directory / name, tmp_path)
    if where == "world_writable_dir":
        os.chmod(directory, 0o777)
        refused = str(directory)
    else:
        os.chmod(directory, 0o700)
        os.chmod(directory / name, 0o775)
        refused = str(directory / name)
    with pytest.warns(RuntimeWarning, match=refused):
        _assert_kernels_run_right()
    assert not fresh.exists(), "the planted library's code ran"
    if where == "group_writable_file":      # rebuilt and renamed over it: the next process uses it
        assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o700


@needs_compiler
@needs_root
def test_a_library_of_another_owner_is_never_loaded(fresh, tmp_path, built_library, monkeypatch):
    """Another user's library in the cache, or in the shared temporary folder that served as a
    fallback before (no private cache works here: the cache path lies under a file)."""
    name = built_library.name
    directory = cache.private_directory(tmp_path / "cache" / "cpu")
    _plant(directory / name, tmp_path)
    os.chown(directory / name, OTHER_UID, OTHER_UID)
    with pytest.warns(RuntimeWarning, match=f"{directory / name} is owned by user id {OTHER_UID}"):
        _assert_kernels_run_right()
    assert not fresh.exists(), "the planted library's code ran"

    monkeypatch.setattr(cpu, "_LIBRARIES", {})
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir(mode=0o1777)
    monkeypatch.setattr(cpu.tempfile, "tempdir", str(shared_tmp))
    old_fallback = shared_tmp / "scm_ops_cpu"
    _plant(old_fallback / name, tmp_path)
    os.chown(old_fallback, OTHER_UID, OTHER_UID)
    os.chown(old_fallback / name, OTHER_UID, OTHER_UID)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SCM_OPS_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    _assert_kernels_run_right()
    assert not fresh.exists(), "the planted library's code ran"
    assert sorted(p.name for p in shared_tmp.iterdir()) == ["scm_ops_cpu"], "the private build was not removed"


@needs_compiler
def test_a_truncated_library_is_rebuilt(fresh, tmp_path, built_library):
    """A killed build's partial file under the cached name: rebuilt, not a crash."""
    name = built_library.name
    good = built_library.read_bytes()
    directory = cache.private_directory(tmp_path / "cache" / "cpu")
    (directory / name).write_bytes(good[: len(good) // 3])
    os.chmod(directory / name, 0o700)
    _assert_kernels_run_right()
    assert (directory / name).stat().st_size == len(good)


@needs_compiler
def test_no_writable_cache_builds_for_the_process(fresh, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SCM_OPS_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(cpu.tempfile, "tempdir", str(private_tmp))
    _assert_kernels_run_right()
    assert list(private_tmp.iterdir()) == []


WORKER = textwrap.dedent("""
    import os, pathlib, sys, time
    barrier, rank, ranks = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    import torch
    from scm_ops.structured import chebyshev, cpu
    from scm_ops.structured.stencil import OFFSETS
    from scm_ops.testing import random_stencil
    (barrier / rank).touch()
    while len(list(barrier.iterdir())) < ranks:      # every process starts building at once
        time.sleep(0.01)
    assert cpu.library() is not None, "no library"
    w, d = random_stencil(2, 4, torch.float64, "cpu", grid=(4, 5))
    f = torch.rand(2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = chebyshev.ChebyshevFilter.apply(f, w, d, 0.002, 16, OFFSETS[4], False)
    os.environ["SCM_OPS_CPU_KERNELS"] = "0"
    ref = chebyshev.ChebyshevFilter.apply(f, w, d, 0.002, 16, OFFSETS[4], False)
    torch.testing.assert_close(u, ref, rtol=1e-12, atol=1e-12)
    print("ok")
""")


@needs_compiler
def test_processes_building_at_once_each_get_a_complete_library(tmp_path):
    """Four processes, an empty cache, released together (as torchrun's ranks on one node)."""
    ranks, barrier = 4, tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, SCM_OPS_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(barrier), str(rank), str(ranks)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(ranks)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    entries = sorted(p.name for p in (tmp_path / "cache" / "cpu").iterdir())
    assert len(entries) == 1 and entries[0].endswith(".so"), entries     # no partial files, no build folders
    ctypes.CDLL(str(tmp_path / "cache" / "cpu" / entries[0]))


# -- from a clone's root ---------------------------------------------------------------------------

def test_kernels_attach_from_a_clone(tmp_path, monkeypatch):
    """A source tree imported from a clone's root (no scm_ops.kernels importable) gets the
    clone's kernels/ as scm_ops.kernels; a folder that is not a clone of scm-ops does not."""
    from scm_ops import _source_tree

    def tree(root, pyproject):
        (root / "scm_ops").mkdir(parents=True)
        (root / "scm_ops" / "__init__.py").write_text("")
        (root / "kernels" / "structured").mkdir(parents=True)
        (root / "kernels" / "structured" / "__init__.py").write_text("ORIGIN = 'clone'\n")
        (root / "pyproject.toml").write_text(pyproject)
        return types.SimpleNamespace(__file__=str(root / "scm_ops" / "__init__.py"))

    for name in [n for n in sys.modules if n.startswith("scm_ops.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(_source_tree.importlib.util, "find_spec", lambda name, *args: None)
    elsewhere = tree(tmp_path / "site", '[project]\nname = "other"\n')
    _source_tree.attach_source_kernels(elsewhere)
    assert "scm_ops.kernels" not in sys.modules and not hasattr(elsewhere, "kernels")
    clone = tree(tmp_path / "clone", '[project]\nname = "scm-ops"\n')
    _source_tree.attach_source_kernels(clone)
    assert clone.kernels is sys.modules["scm_ops.kernels"]
    assert list(clone.kernels.__path__) == [str(tmp_path / "clone" / "kernels")]
    assert importlib.import_module("scm_ops.kernels.structured").ORIGIN == "clone"


def test_the_source_tree_runs_from_a_clone_root(tmp_path):
    """`python -c` in the root of a copy of the repository: scm_ops is imported from that copy
    (the current directory first on sys.path) and the default CPU path runs forward and
    backward, the C kernels read from its kernels/."""
    clone = tmp_path / "clone"
    for part in ("scm_ops", "kernels"):
        shutil.copytree(REPO / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", clone)
    script = textwrap.dedent("""
        import pathlib, torch, scm_ops
        from scm_ops.structured import cpu
        assert pathlib.Path(scm_ops.__file__).parent == pathlib.Path.cwd() / "scm_ops", scm_ops.__file__
        assert cpu.library() is not None
        f0 = torch.rand(2, 14, 14, requires_grad=True)
        s0 = torch.randn(2, 5, 14, 14, requires_grad=True)
        f, s = scm_ops.ActivationDiffusion((14, 14))(f0, s0)
        (f.sum() + s.square().sum()).backward()
        assert torch.isfinite(f0.grad).all() and torch.isfinite(s0.grad).all()
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SCM_OPS_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
