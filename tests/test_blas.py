"""Tests of triattn_hub.blas against the real mlx-cpu, OpenBLAS and dynamic linker.

mlx binds its BLAS when `mlx.core` is imported, once per process, so every case runs in a
fresh Python subprocess. Each subprocess prints one JSON line as its last line of output.
The subprocesses share one temporary XDG_CACHE_HOME, so the unprefixed OpenBLAS copy is
built from scratch once per test session.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from triattn_hub import blas
from triattn_hub.blas import detect_mlx_build

INSTALLED = [dist.metadata["Name"] or "" for dist in importlib.metadata.distributions()]
needs_mlx_cpu = pytest.mark.skipif(
    not sys.platform.startswith("linux") or detect_mlx_build(INSTALLED) != "cpu",
    reason="enable_fast_cpu_blas acts only on Linux with the mlx-cpu build",
)

PRINT_INFO = """
import json
from triattn_hub.blas import enable_fast_cpu_blas
print(json.dumps(enable_fast_cpu_blas()))
"""

COMPARE_WITH_NUMPY = """
import json
from triattn_hub.blas import enable_fast_cpu_blas
info = enable_fast_cpu_blas()
import mlx.core as mx
import numpy as np

rng = np.random.default_rng(0)
a = rng.standard_normal((257, 300)).astype(np.float32)
b = rng.standard_normal((300, 129)).astype(np.float32)
product = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))
exact = a.astype(np.float64) @ b.astype(np.float64)

z = (rng.standard_normal((64, 48)) + 1j * rng.standard_normal((64, 48))).astype(np.complex64)
w = (rng.standard_normal((48, 32)) + 1j * rng.standard_normal((48, 32))).astype(np.complex64)
complex_product = np.array(mx.matmul(mx.array(z), mx.array(w), stream=mx.cpu))
complex_exact = z.astype(np.complex128) @ w.astype(np.complex128)

singular = np.array(mx.linalg.svd(mx.array(a), compute_uv=False, stream=mx.cpu))
singular_exact = np.linalg.svd(a.astype(np.float64), compute_uv=False)

print(json.dumps({
    "info": info,
    "matmul_error": float(np.abs(product - exact).max() / np.abs(exact).max()),
    "cgemm_error": float(np.abs(complex_product - complex_exact).max() / np.abs(complex_exact).max()),
    "svd_error": float(np.abs(singular - singular_exact).max() / singular_exact.max()),
}))
"""

TOO_LATE = """
import json, logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
import mlx.core
from triattn_hub.blas import enable_fast_cpu_blas
print(json.dumps(enable_fast_cpu_blas()))
"""

PRINT_INFO_THEN_IMPORT_MLX = """
import json
from triattn_hub.blas import enable_fast_cpu_blas
info = enable_fast_cpu_blas()
import mlx.core
print(json.dumps(info))
"""

CALL_TWICE_AROUND_IMPORT = """
import json
from triattn_hub.blas import enable_fast_cpu_blas
first = enable_fast_cpu_blas()
import mlx.core
second = enable_fast_cpu_blas()
print(json.dumps({"first": first, "second": second}))
"""

EXPECT_ERROR = """
import json
from triattn_hub.blas import enable_fast_cpu_blas
from triattn_hub.errors import BlasLibraryError
try:
    enable_fast_cpu_blas()
except BlasLibraryError as error:
    print(json.dumps({"error": str(error)}))
else:
    print(json.dumps({"error": None}))
"""


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")


def run_python(code: str, cache_home: Path, **env_overrides: str) -> tuple[dict, str]:
    """Run `code` in a new interpreter and return its last stdout line parsed as JSON, and its stderr."""
    env = dict(os.environ)
    env.pop("TRIATTN_HUB_BLAS", None)
    env.pop("LD_PRELOAD", None)
    env["XDG_CACHE_HOME"] = str(cache_home)
    env.update(env_overrides)
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert completed.returncode == 0, f"subprocess failed:\n{completed.stderr}"
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def cblas_sgemm_binding_of_libmlx(log_dir: Path) -> str:
    """Return the library that libmlx.so's cblas_sgemm was bound to, from LD_DEBUG=bindings logs."""
    targets = []
    for log in log_dir.glob("ld.*"):
        for line in log.read_text(errors="replace").splitlines():
            if "libmlx.so" in line and "`cblas_sgemm'" in line and " to " in line:
                target = line.split(" to ", 1)[1].split(" [", 1)[0]
                targets.append(target)
    assert len(targets) == 1, f"expected one cblas_sgemm binding of libmlx.so, found {targets}"
    return targets[0]


@needs_mlx_cpu
def test_enable_loads_openblas(cache_home):
    info, _ = run_python(PRINT_INFO, cache_home)
    assert info["backend"] == "openblas"
    assert info["version"]
    assert info["threads"] >= 1
    assert "/" not in info["library"]
    assert info["reason"] is None


@needs_mlx_cpu
def test_mlx_results_match_numpy(cache_home):
    result, _ = run_python(COMPARE_WITH_NUMPY, cache_home)
    assert result["info"]["backend"] == "openblas"
    # float32 has a unit roundoff of 6e-8, so a dot product of 300 terms stays well under 1e-5 relative.
    assert result["matmul_error"] < 1e-5
    assert result["cgemm_error"] < 1e-5
    assert result["svd_error"] < 1e-5


@needs_mlx_cpu
@pytest.mark.parametrize(
    ("setting", "expected_library"),
    [("auto", "libopenblas-unprefixed-"), ("off", "libblas-")],
)
def test_libmlx_binds_cblas_sgemm(cache_home, tmp_path, setting, expected_library):
    info, _ = run_python(
        PRINT_INFO_THEN_IMPORT_MLX,
        cache_home,
        TRIATTN_HUB_BLAS=setting,
        LD_DEBUG="bindings",
        LD_DEBUG_OUTPUT=str(tmp_path / "ld"),
    )
    target = cblas_sgemm_binding_of_libmlx(tmp_path)
    assert Path(target).name.startswith(expected_library), target
    assert info["backend"] == ("openblas" if setting == "auto" else "bundled")


@needs_mlx_cpu
def test_off_keeps_bundled(cache_home):
    info, _ = run_python(PRINT_INFO, cache_home, TRIATTN_HUB_BLAS="off")
    assert info["backend"] == "bundled"
    assert info["reason"] == "TRIATTN_HUB_BLAS=off"
    assert info["library"] is None


@needs_mlx_cpu
def test_call_after_mlx_import_reports_too_late(cache_home):
    info, stderr = run_python(TOO_LATE, cache_home)
    assert info["backend"] == "bundled"
    assert info["reason"].startswith("too late")
    assert "WARNING triattn_hub.blas" in stderr
    assert "too late" in stderr


@needs_mlx_cpu
def test_second_call_returns_first_result(cache_home):
    result, _ = run_python(CALL_TWICE_AROUND_IMPORT, cache_home)
    assert result["first"]["backend"] == "openblas"
    assert result["second"] == result["first"]


@needs_mlx_cpu
def test_explicit_path_loads_that_library(cache_home, monkeypatch):
    # This only writes the unprefixed copy. Nothing is loaded into the test process.
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    library = blas._unprefixed_scipy_openblas()

    info, _ = run_python(PRINT_INFO, cache_home, TRIATTN_HUB_BLAS=str(library))
    assert info["backend"] == "openblas"
    assert info["source"] == "TRIATTN_HUB_BLAS"
    assert info["library"] == library.name


@needs_mlx_cpu
def test_explicit_missing_path_raises(cache_home, tmp_path):
    missing = tmp_path / "libopenblas-missing.so"
    result, _ = run_python(EXPECT_ERROR, cache_home, TRIATTN_HUB_BLAS=str(missing))
    assert result["error"] is not None
    assert str(missing) in result["error"]
    assert "does not exist" in result["error"]


@needs_mlx_cpu
def test_explicit_library_without_cblas_raises(cache_home):
    result, _ = run_python(EXPECT_ERROR, cache_home, TRIATTN_HUB_BLAS="libm.so.6")
    assert result["error"] is not None
    assert "libm.so.6" in result["error"]
    assert "cblas_sgemm" in result["error"]


@needs_mlx_cpu
def test_unwritable_cache_skips_scipy_openblas(tmp_path):
    not_a_directory = tmp_path / "cache-file"
    not_a_directory.write_text("")
    info, stderr = run_python(PRINT_INFO, not_a_directory)
    assert info["source"] != "scipy-openblas32"
    # A system OpenBLAS, where one is installed, is the next source.
    if info["backend"] == "bundled":
        assert "cannot create the cache directory" in info["reason"]
        assert "tens of times slower" in stderr


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["mlx", "mlx-cpu", "numpy"], "cpu"),
        (["mlx", "mlx_cpu"], "cpu"),
        (["mlx", "mlx-metal"], "metal"),
        (["mlx", "mlx-cuda-12"], "cuda"),
        (["mlx", "mlx-cuda-13", "mlx-cpu"], "cuda"),
        (["MLX-CUDA"], "cuda"),
        (["mlx", "numpy"], None),
        ([], None),
    ],
)
def test_detect_mlx_build(names, expected):
    assert detect_mlx_build(names) == expected
