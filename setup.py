"""Build dtfast and, where possible, its one extension ``dtfast._C``.

- ``CUDAExtension`` when nvcc is found (or ``DTFAST_FORCE_CUDA=1``), ``CppExtension`` otherwise
  (or with ``DTFAST_FORCE_CUDA=0``: a CPU-only build on a machine with nvcc).
- ``DTFAST_SKIP_EXT=1`` builds no extension: ``dtfast.ops`` then uses Triton / the PyTorch reference.
- ``DTFAST_CUDA_ARCHS`` (default "8.0;9.0") picks the CUDA targets; ``MAX_JOBS`` is respected by torch's
  build helper.

The extension imports torch at build time: install torch first and build with
``pip install --no-build-isolation -e .`` so it links against the torch that is installed.
"""

import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# -ffp-contract=off: no FMA contraction, so symmetric expressions (qhat_s - qhat_g at s == g) cancel exactly.
# torch's build helper adds the -std its headers need. tests/test_ops_cuda_build.py compiles the .cu files with
# these same flags (it runs this file with run_name != "__main__" to read them).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
LINK_FLAGS = ["-fopenmp"]
INCLUDE_DIRS = [os.path.join(ROOT, "csrc")]


def extension_sources():
    """(C++ sources, CUDA sources) of dtfast._C, relative to the repository root."""
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True, root_dir=ROOT))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True, root_dir=ROOT))
    return cpp_sources, cuda_sources


def cuda_archs():
    return os.environ.get("DTFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)


def nvcc_toolkit_root():
    """Root of the CUDA toolkit whose nvcc is on PATH (nvcc may be a wrapper script outside the toolkit, which
    makes torch guess CUDA_HOME wrongly), or None."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        probe = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (probe.stdout + probe.stderr).splitlines():
        if line.startswith("#$ TOP="):
            root = os.path.realpath(line.split("=", 1)[1].strip())
            return root if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) else None
    return None


def configure_cuda_home():
    """Set CUDA_HOME to the nvcc's toolkit unless the user set CUDA_HOME/CUDA_PATH (call before torch's
    cpp_extension is imported: it reads CUDA_HOME once)."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        root = nvcc_toolkit_root()
        if root:
            os.environ["CUDA_HOME"] = root
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")


def cuda_library_include_flags(cuda_home):
    """nvcc flags adding the cuSPARSE/cuBLAS/cuSOLVER headers that torch's CUDA headers include, taken from the
    pip `nvidia` packages that come with a CUDA build of torch, when the toolkit itself lacks them (a minimal
    nvcc + cudart install). -isystem keeps the toolkit's own headers (cuda_runtime.h, ...) first."""
    if cuda_home is None or os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    wanted = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")
    flags = []
    for base in nvidia.__path__:
        for include in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if any(os.path.exists(os.path.join(include, name)) for name in wanted):
                flags += ["-isystem", include]
    return flags


def _extensions():
    if os.environ.get("DTFAST_SKIP_EXT", "0") == "1":
        return [], {}
    configure_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "dtfast: torch is not importable at build time; building no extension "
            "(install torch first, then `pip install --no-build-isolation -e .`)"
        )
        return [], {}

    cpp_sources, cuda_sources = extension_sources()
    if not cpp_sources:
        return [], {}
    # rpath to torch's libraries: `import dtfast._C` then works before `import torch` too.
    link_flags = [*LINK_FLAGS, f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"]
    force_cuda = os.environ.get("DTFAST_FORCE_CUDA", "")  # "1": CUDA even without nvcc found, "0": never
    use_cuda = bool(cuda_sources) and (force_cuda == "1" or (force_cuda != "0" and CUDA_HOME is not None))
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_archs())
        ext = CUDAExtension(
            "dtfast._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=INCLUDE_DIRS,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + cuda_library_include_flags(CUDA_HOME)},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "dtfast._C",
            sources=cpp_sources,
            include_dirs=INCLUDE_DIRS,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _readme():
    path = os.path.join(ROOT, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":  # pip / setuptools run this file as __main__
    ext_modules, cmdclass = _extensions()

    setup(
        name="dtfast",
        version="0.1.0",
        description="Fast DreamTeacher: distil diffusion-model features into timm backbones",
        long_description=_readme(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["dtfast", "dtfast.*"]),
        package_data={"dtfast": ["assets/**/*"]},
        install_requires=["torch>=2.4,<=2.14.1", "numpy"],
        extras_require={
            # transformers reads a Stable-Diffusion folder's text_encoder/ and tokenizer/; DALI decodes JPEGs (GPU or
            # CPU); the [dali] extra stays for users who add it to an ops-only install
            "train": ["timm>=1.0", "diffusers>=0.30", "transformers", "safetensors", "pyyaml", "pillow", "deepspeed",
                      "matplotlib", "nvidia-dali-cuda130"],
            "dali": ["nvidia-dali-cuda130"],
            "dev": ["pytest>=7.3", "ninja", "ruff"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
