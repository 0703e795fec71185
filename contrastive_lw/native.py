"""The package's C kernel (``csrc/cut_and_augment.c``): compiled with the system's C compiler on
first use, cached per machine, loaded with ctypes.

Without a compiler (or with ``CONTRASTIVE_LW_NATIVE=0``) :func:`cut_and_augment_kernel` returns
None and callers use their PyTorch path: the same values, slower. The library is cached beside
the decoded datasets (:func:`contrastive_lw.data.cache_dir`)."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "cut_and_augment.c"
# No -ffast-math: linked into a shared library it sets flush-to-zero for the whole process.
_MATH = ("-O3", "-fno-math-errno", "-ffinite-math-only", "-fno-signed-zeros", "-fno-trapping-math",
         "-fassociative-math")
# Tried in order: OpenMP threads (sharing PyTorch's libgomp on Linux) and this CPU's vector units,
# then without either (e.g. Apple clang has no -fopenmp).
FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURE = [_P, _I, _I, _I, _P, _P, _P, _I, _I, _P, _P, _P, ctypes.c_int, _P]


@functools.cache
def cut_and_augment_kernel() -> Callable[..., int] | None:
    """The C function ``cut_and_augment`` (arguments: see its source), or None where it cannot be
    built here (a warning says why, once)."""
    if os.environ.get("CONTRASTIVE_LW_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return _unavailable("no C compiler found (install gcc or clang, or set CC)")
    error = ""
    for flags in FLAG_SETS:
        try:
            library = ctypes.CDLL(str(_build(compiler, [*_MATH, *flags])))
        except (OSError, subprocess.CalledProcessError) as err:
            error = getattr(err, "stderr", None) or str(err)
            continue
        function = library.cut_and_augment
        function.argtypes, function.restype = _SIGNATURE, ctypes.c_int
        return function
    return _unavailable(f"{compiler} could not build {SOURCE.name}: {error.strip()[-500:]}")


def _build(compiler: str, flags: list[str]) -> Path:
    """The shared library built from :data:`SOURCE` with ``flags``, from the cache when there (the
    key covers the source, the compiler, the flags and the machine, as -march=native is per CPU)."""
    from .data import cache_dir  # the dataset cache's folder (importing data loads torchvision)

    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, *(s.encode() for s in (compiler, *flags, *platform.uname()))]))
    target = cache_dir() / f"cut_and_augment-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # then one rename: safe across processes
            built = Path(tmp) / target.name
            subprocess.run([compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(built), "-lm"],
                           check=True, capture_output=True, text=True)
            os.replace(built, target)
    return target


def _unavailable(reason: str) -> None:
    warnings.warn(f"contrastive_lw: the C augmentation kernel is unavailable ({reason}); using the slower "
                  "PyTorch path (set CONTRASTIVE_LW_NATIVE=0 to silence this)", RuntimeWarning, stacklevel=3)
    return None
