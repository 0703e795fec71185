"""The package's C kernels (``csrc/*.c``): each compiled with the system's C compiler on first
use, cached per machine, loaded with ctypes.

- ``cut_and_augment``: the augmentation's cut + warp + colour of uint8 patches on the CPU;
- ``cosine_triplet``: the cosine triplet loss and its gradient in one pass over the rows;
- ``max_pool_relu``: the greedy first block's max-pool + bias + ReLU and its weight and bias gradients;
- ``exp_rows``: the in-batch softmax loss's exponentials of a similarity matrix and their row sums;
- ``normalize``: the network's per-channel input normalisation, written channels_last;
- ``uniform``: the augmentation's uniform draws, from a counter-based generator (in parallel).

Without a compiler (or with ``CONTRASTIVE_LW_NATIVE=0``) each loader returns None and callers use
their PyTorch path: the same values, slower (:func:`pytorch_paths` switches them off within a
block). The libraries are cached beside the decoded datasets
(:func:`contrastive_lw.data.cache_dir`)."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

SOURCES = Path(__file__).with_name("csrc")
# No -ffast-math: linked into a shared library it sets flush-to-zero for the whole process.
_MATH = ("-O3", "-fno-math-errno", "-fno-signed-zeros", "-fno-trapping-math", "-fassociative-math")
# -ffinite-math-only lets the compiler drop NaN checks: only for a kernel whose inputs are finite.
_FINITE = ("-ffinite-math-only",)
# Tried in order: OpenMP threads (sharing PyTorch's libgomp on Linux) and this CPU's vector units,
# then without either (e.g. Apple clang has no -fopenmp).
FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def cut_and_augment_kernel() -> Callable[..., int] | None:
    """The C function ``cut_and_augment`` (arguments: see its source), or None where it cannot be
    built here (a warning says why, once)."""
    return _kernel("cut_and_augment", [_P, _I, _I, _I, _P, _P, _P, _I, _I, _P, _P, _P, ctypes.c_int, _P],
                   ctypes.c_int, _FINITE, "the augmentation")


@functools.cache
def cosine_triplet_kernel() -> Callable[..., None] | None:
    """The C function ``cosine_triplet`` (arguments: see its source), or None where it cannot be
    built here (a warning says why, once). Built without -ffinite-math-only: a NaN embedding gives
    a NaN loss, which the trainer reports."""
    return _kernel("cosine_triplet", [_I, _I, _P, _P, _P, ctypes.c_float, _P, _P, _P, _P], None, (),
                   "the triplet loss")


@functools.cache
def max_pool_relu_kernels() -> tuple[Callable[..., None], Callable[..., int]] | None:
    """The C functions ``max_pool_relu`` and ``max_pool_relu_backward`` (arguments: see their
    source), or None where they cannot be built here (a warning says why, once). Built without
    -ffinite-math-only: a NaN stays NaN."""
    forward = _kernel("max_pool_relu", [_I, _I, _I, _I, _P, _I, _P, _P, _P], None, (), "the max-pool")
    if forward is None:
        return None
    return forward, _kernel("max_pool_relu", [_I, _I, _I, _I, _I, _P, _I, _I, _I, _P, _P, _P, _P, _P], ctypes.c_int,
                            (), "the max-pool", "max_pool_relu_backward")


@functools.cache
def exp_row_sums_kernel() -> Callable[..., None] | None:
    """The C function ``exp_row_sums`` of ``csrc/exp_rows.c`` (arguments: see its source), or None
    where it cannot be built here (a warning says why, once). Built without -ffinite-math-only: a
    NaN stays NaN."""
    return _kernel("exp_rows", [_I, _I, _P, ctypes.c_float, _P], None, (), "the softmax loss",
                   "exp_row_sums")


@functools.cache
def normalize_kernel() -> Callable[..., int] | None:
    """The C function ``normalize`` (arguments: see its source), or None where it cannot be built
    here (a warning says why, once). Built without -ffinite-math-only: a NaN pixel stays NaN."""
    return _kernel("normalize", [_I, _I, _I, _I, _P, _P, ctypes.c_int, _P, _P, _P], ctypes.c_int, (),
                   "the normalisation")


@functools.cache
def uniform_kernel() -> Callable[..., None] | None:
    """The C function ``uniform`` (arguments: see its source), or None where it cannot be built
    here (a warning says why, once)."""
    return _kernel("uniform", [ctypes.c_uint64, _I, _P], None, (), "the augmentation's draws")


def check(status: int, purpose: str) -> None:
    """Raise MemoryError where a kernel returned -1 (its scratch memory could not be allocated)."""
    if status != 0:
        raise MemoryError(f"the C kernel of {purpose} could not allocate its scratch memory")


LOADERS = ("cut_and_augment_kernel", "cosine_triplet_kernel", "exp_row_sums_kernel", "max_pool_relu_kernels",
           "normalize_kernel", "uniform_kernel")


@contextlib.contextmanager
def pytorch_paths(loaders: Sequence[str] = LOADERS) -> Iterator[None]:
    """Within the block each named loader (all by default) returns None, so its callers take their
    PyTorch paths: to count a step's FLOPs with ``torch.utils.flop_counter``, which does not see the
    C kernels (the bench counts the model's FLOPs so), or to time a kernel against its PyTorch path."""
    module = sys.modules[__name__]
    saved = {name: getattr(module, name) for name in loaders}
    try:
        for name in loaders:
            setattr(module, name, lambda: None)
        yield
    finally:
        for name, loader in saved.items():
            setattr(module, name, loader)


def _kernel(name: str, argtypes: list, restype: type | None, extra_flags: Sequence[str],
            purpose: str, function_name: str | None = None) -> Callable | None:
    """Function ``function_name`` (default ``name``) of ``csrc/<name>.c``, built with the first flag
    set that compiles."""
    if os.environ.get("CONTRASTIVE_LW_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return _unavailable(purpose, "no C compiler found (install gcc or clang, or set CC)")
    source, error = SOURCES / f"{name}.c", ""
    for flags in FLAG_SETS:
        try:
            library = ctypes.CDLL(str(_build(source, compiler, [*_MATH, *extra_flags, *flags])))
        except (OSError, subprocess.CalledProcessError) as err:
            error = getattr(err, "stderr", None) or str(err)
            continue
        function = getattr(library, function_name or name)
        function.argtypes, function.restype = argtypes, restype
        return function
    return _unavailable(purpose, f"{compiler} could not build {source.name}: {error.strip()[-500:]}")


def library_path(source: Path, compiler: str, flags: Sequence[str]) -> Path:
    """Where the library of ``source`` built with ``flags`` is cached: the key covers the source,
    the compiler, the flags, the machine and, for ``-march=native``, the instruction sets the
    compiler targets on this CPU, so a cache copied to another CPU is rebuilt, never run."""
    from ..data import cache_dir  # the dataset cache's folder (importing data loads torchvision)

    target_cpu = cpu_target(compiler) if "-march=native" in flags else ""
    parts = (compiler, *flags, *platform.uname(), target_cpu)
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *(s.encode() for s in parts)]))
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


@functools.cache
def cpu_target(compiler: str) -> str:
    """The macros ``compiler -march=native`` predefines (``__AVX512F__``, ``__FMA__``, ...): the
    instruction sets a native build uses on this CPU (empty where the compiler cannot say)."""
    try:
        return subprocess.run([compiler, "-march=native", "-dM", "-E", "-x", "c", os.devnull],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(source: Path, compiler: str, flags: list[str]) -> Path:
    """The shared library built from ``source`` with ``flags``, from the cache when there
    (:func:`library_path`)."""
    target = library_path(source, compiler, flags)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # then one rename: safe across processes
            built = Path(tmp) / target.name
            subprocess.run([compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(built), "-lm"],
                           check=True, capture_output=True, text=True)
            os.replace(built, target)
    return target


def _unavailable(purpose: str, reason: str) -> None:
    warnings.warn(f"contrastive_lw: the C kernel of {purpose} is unavailable ({reason}); using the slower "
                  "PyTorch path (set CONTRASTIVE_LW_NATIVE=0 to silence this)", RuntimeWarning, stacklevel=4)
    return None
