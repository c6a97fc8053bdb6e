"""The C kernels of csrc/ as one shared library, compiled at first use and loaded with ctypes.

    from sailor_engine.kernels import native
    lib = native.load()          # ctypes.CDLL, or None: native.error() says why

Used by cpu_attention.py (KV-cache attention), cpu_decoder.py (a whole decoder forward over the
cache), cpu_flash.py (varlen training attention, forward and backward) and cpu_sample.py (the
generator's sampling step). Build: `cc -O3 -march=native -ffp-contract=off` (with -fopenmp where
the compiler has it) into
$SAILOR_ENGINE_CACHE (default ~/.cache/sailor-engine), keyed by the sources, the flags, the compiler
and the CPU, written atomically (concurrent ranks may race; the loser's rename is harmless). No
compiler, or SAILOR_ENGINE_NATIVE=0: load() is None, status() says why, and callers keep their torch
paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = ("cpu_attention.c", "cpu_decoder.c", "cpu_flash.c", "cpu_sample.c")
HEADERS = ("vec.h",)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c11", "-shared", "-fPIC")
i64, ptr = ctypes.c_int64, ctypes.c_void_p

# name -> argument types; every function returns int64 (0, or an error code documented in the C)
SIGNATURES = {
    "se_attend": [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, i64],
    "se_append": [ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64],
    "se_decoder": [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float, ptr, i64, ptr, ptr, ptr, ptr, i64, i64,
                   ptr, ptr, ptr, i64],
    "se_flash_fwd": [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i64],
    "se_flash_bwd": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64],
    "se_sample": [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64],
}

def _sources() -> list[Path]:
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parent / "csrc"):  # wheel, source tree
        if (d / SOURCES[0]).is_file():
            return [d / s for s in SOURCES + HEADERS]
    raise FileNotFoundError("csrc/ not found next to sailor_engine.kernels")


def cache_dir() -> Path:
    if root := os.environ.get("SAILOR_ENGINE_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sailor-engine"


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), info[:4096])
    except OSError:
        return platform.processor() + platform.machine()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    paths = _sources()  # the key covers the headers too; only the .c files are compiled
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    parts = [p.read_bytes() for p in paths] + [" ".join(FLAGS).encode(), version.encode(), _cpu_id().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = cache_dir() / f"sailor-native-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            # with OpenMP if the compiler has it (the rows of large calls on torch's threads), else without
            for extra in (["-fopenmp"], []):
                r = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, *[str(p) for p in paths if p.suffix == ".c"], "-lm"],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{cc} failed on csrc/:\n{r.stderr[-2000:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i64, args
    return lib


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("SAILOR_ENGINE_NATIVE", "1") == "0":
        return None, "disabled by SAILOR_ENGINE_NATIVE=0"
    try:
        return _build(), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"{type(e).__name__}: {e}"


def load() -> ctypes.CDLL | None:
    """The library, built on the first call; None when it cannot be had (error() says why)."""
    return _loaded()[0]


def error() -> str | None:
    """Why load() is None, else None."""
    return _loaded()[1]
