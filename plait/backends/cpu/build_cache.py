"""Where the CPU backend's compiled kernels live, and how one gets there safely.

Layout (``root``: ``$PLAIT_KERNEL_DIR``, else ``$XDG_CACHE_HOME/plait/kernels``, else
``~/.cache/plait/kernels``)::

    <root>/<cache_tag>-torch<version>-<env digest>/   one per interpreter + torch build
        env.json                  what the digest covers (for people)
        <name>.so                 an installed module: complete, or absent
        <name>.lock               the build lock (build_lock.py); stays on disk
        .build-<name>-<random>/   a build in progress (removed by the next builder if left)

The environment directory is keyed by :class:`BuildEnv`: the interpreter (``sys.prefix``,
``sys.executable``, its version), the torch build (version, git commit, C++ ABI) and the
compiler; the module name carries the sources' digest, the SIMD level and the flags
(``cpp_build.extension``). So two virtual environments never share, and never rebuild, each
other's modules.

What holds for ``<name>.so``: it appears only by ``os.replace`` of a finished build from its
private ``.build-*`` directory, under the lock, so a start that finds it finds a whole module,
and a build killed at any point leaves either the old state or the new one. No wait is
unbounded: the lock wait and the compile are each limited by ``$PLAIT_KERNEL_BUILD_TIMEOUT``
(seconds, default :data:`DEFAULT_TIMEOUT_S`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from plait.backends.cpu.build_lock import build_lock
from plait.backends.cpu.compile_worker import end_session

DEFAULT_TIMEOUT_S = 1200.0
_SUFFIX = ".so"
_WORKER = Path(__file__).with_name("compile_worker.py")
#: runs compile_worker.py as a script: no ``plait`` import, no plait/backends/cpu on sys.path
_RUN_WORKER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildEnv:
    """What a compiled module depends on besides its sources and flags."""

    prefix: str
    executable: str
    python: str
    cache_tag: str
    torch_version: str
    torch_git: str
    cxx11_abi: bool
    compiler: str

    @classmethod
    def current(cls) -> BuildEnv:
        import torch

        return cls(
            prefix=os.path.realpath(sys.prefix),
            executable=sys.executable,
            python=sys.version,
            cache_tag=sys.implementation.cache_tag or "py",
            torch_version=torch.__version__,
            torch_git=torch.version.git_version,
            cxx11_abi=bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
            compiler=os.environ.get("CXX", "c++"),
        )

    def directory(self, root: Path) -> Path:
        """This environment's directory under ``root``: a readable tag and a digest of all."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"{self.cache_tag}-torch{self.torch_version}")
        return root / f"{tag}-{digest.hexdigest()[:16]}"


def default_root() -> Path:
    if os.environ.get("PLAIT_KERNEL_DIR"):
        return Path(os.environ["PLAIT_KERNEL_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "plait" / "kernels"


def timeout_s() -> float:
    raw = os.environ.get("PLAIT_KERNEL_BUILD_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(
            f"PLAIT_KERNEL_BUILD_TIMEOUT must be a positive number of seconds, got {raw!r}"
        )
    return value


def load(
    name: str,
    sources: list[Path],
    *,
    cflags: list[str],
    ldflags: list[str],
    root: Path | None = None,
) -> ModuleType:
    """The module ``name`` built from ``sources``: imported from the cache, else built (once,
    under the lock, across processes), installed, then imported."""
    env = BuildEnv.current()
    directory = env.directory(default_root() if root is None else root)
    target = directory / f"{name}{_SUFFIX}"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        _describe_env(directory, env)
        limit = timeout_s()
        with build_lock(directory / f"{name}.lock", timeout_s=limit):
            if not target.exists():  # else another process installed it while we waited
                _build_and_install(name, sources, cflags, ldflags, target, limit)
    return _import(name, target)


def _describe_env(directory: Path, env: BuildEnv) -> None:
    path = directory / "env.json"
    if not path.exists():
        tmp = directory / f".env.json.{os.getpid()}"
        tmp.write_text(json.dumps(dataclasses.asdict(env), indent=1) + "\n")
        os.replace(tmp, path)


def _build_and_install(
    name: str,
    sources: list[Path],
    cflags: list[str],
    ldflags: list[str],
    target: Path,
    limit: float,
) -> None:
    # holding the lock, any other build directory of this name is a dead builder's
    for stale in target.parent.glob(f".build-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=target.parent))
    try:
        spec = {
            "parent": os.getpid(),
            "name": name,
            "sources": [str(s) for s in sources],
            "extra_cflags": cflags,
            "extra_ldflags": ldflags,
            "build_directory": str(work),
        }
        _compile(spec, work, limit)
        os.replace(work / f"{name}{_SUFFIX}", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compile(spec: dict, work: Path, limit: float) -> None:
    """Run compile_worker.py on ``spec``; its whole session (ninja, the compilers) ends on
    timeout or on an exception here (KeyboardInterrupt included)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_WORKER, str(_WORKER)],
        cwd=work,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(json.dumps(spec).encode(), timeout=limit)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"building {spec['name']} took over {limit:g} s (set "
            f"PLAIT_KERNEL_BUILD_TIMEOUT to allow longer)"
        ) from None
    finally:
        if proc.returncode is None:
            end_session(proc.pid)  # the worker leads its session
            proc.wait()
    if proc.returncode != 0:
        tail = output.decode(errors="replace")[-6000:]
        raise RuntimeError(f"building {spec['name']} failed (exit {proc.returncode}):\n{tail}")


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the kernel module {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
