"""Compile the CUDA sources of dtfast._C with nvcc (compile only), with setup.py's flags, include paths and
target architectures, so a broken .cu fails CI on a machine without a GPU. Skipped only where nvcc is absent.

One nvcc call compiles every csrc/**/*.cu for all targets (minutes on a small CPU machine).
"""

import os
import runpy
import shutil
import subprocess
import sys
import sysconfig

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup():
    """setup.py's build settings and helpers, without running setup()."""
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="dtfast_setup")


def _nvcc():
    return shutil.which("nvcc")


def _cxx_std():
    """The -std torch's own build helper uses: C++20 where ATen's headers demand it."""
    aten_h = os.path.join(cpp_extension.include_paths()[0], "ATen", "ATen.h")
    with open(aten_h) as f:
        return "-std=c++20" if "C++20 or later" in f.read() else "-std=c++17"


def _arch_flags(archs):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def nvcc_command(nvcc, sources, out_dir):
    setup = _setup()
    # The CUDA home setup.py builds with (torch's cpp_extension may have guessed another one at import time).
    cuda_home = setup["configure_cuda_home"]() or cpp_extension.CUDA_HOME
    includes = [*setup["INCLUDE_DIRS"], *cpp_extension.include_paths(), os.path.join(cuda_home, "include")]
    includes.append(sysconfig.get_paths()["include"])
    defines = ["-DWITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    host = ["--compiler-options", "-fPIC"]  # torch's helper passes no cxx flags to nvcc
    cmd = [nvcc, "-c", *sources, "--output-directory", out_dir, _cxx_std(), *cpp_extension.COMMON_NVCC_FLAGS]
    cmd += host + defines + [f"-I{path}" for path in includes]
    cmd += _arch_flags(setup["cuda_archs"]()) + setup["NVCC_FLAGS"] + setup["cuda_library_include_flags"](cuda_home)
    return cmd


def test_cuda_sources_compile(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    _, cuda_sources = _setup()["extension_sources"]()
    assert cuda_sources, "no csrc/**/*.cu found: the CUDA kernels are missing"
    sources = [os.path.join(ROOT, src) for src in cuda_sources]
    cmd = nvcc_command(nvcc, sources, str(tmp_path))
    threads = os.environ.get("MAX_JOBS", "2")
    result = subprocess.run([*cmd, f"--threads={threads}"], check=False, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{result.stdout}\n{result.stderr[-8000:]}"
    objects = [name for name in os.listdir(tmp_path) if name.endswith(".o")]
    assert len(objects) == len(sources), f"expected one object per .cu, got {objects}"


if __name__ == "__main__":  # print the command, for a manual build check
    print(" ".join(nvcc_command(_nvcc() or "nvcc", sys.argv[1:] or ["<source.cu>"], "<out>")))
