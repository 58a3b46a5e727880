"""Build dtfast and, where possible, its one extension ``dtfast._C``.

- ``CUDAExtension`` when nvcc is found (or ``DTFAST_FORCE_CUDA=1``), ``CppExtension`` otherwise.
- ``DTFAST_SKIP_EXT=1`` builds no extension: ``dtfast.ops`` then uses Triton / the PyTorch reference.
- ``DTFAST_CUDA_ARCHS`` (default "8.0;9.0") picks the CUDA targets; ``MAX_JOBS`` is respected by torch's
  build helper.

The extension imports torch at build time: install torch first and build with
``pip install --no-build-isolation -e .`` so it links against the torch that is installed.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("DTFAST_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("dtfast: torch is not importable at build time; building no extension "
              "(install torch first, then `pip install --no-build-isolation -e .`)")
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if not cpp_sources:
        return [], {}
    force_cuda = os.environ.get("DTFAST_FORCE_CUDA", "0") == "1"
    use_cuda = bool(cuda_sources) and (force_cuda or CUDA_HOME is not None)
    openmp = ["-fopenmp"]
    # -ffp-contract=off: no FMA contraction, so symmetric expressions (qhat_s - qhat_g at s == g) cancel exactly.
    # torch's build helper adds the -std its headers need.
    cxx_flags = ["-O3", "-ffp-contract=off", *openmp]
    define_macros = []
    if use_cuda:
        archs = os.environ.get("DTFAST_CUDA_ARCHS", "8.0;9.0")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
        define_macros.append(("WITH_CUDA", None))
        ext = CUDAExtension(
            "dtfast._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension(
            "dtfast._C",
            sources=cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="dtfast",
    version="0.1.0",
    description="Fast DreamTeacher: distil diffusion-model features into timm backbones",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dtfast", "dtfast.*"]) + ["dtfast.kernels"],
    package_dir={"dtfast.kernels": "kernels"},
    package_data={"dtfast": ["assets/*", "configs/*.yaml"]},
    install_requires=["torch>=2.4,<=2.14.1", "numpy"],
    extras_require={
        "train": ["timm>=1.0", "diffusers>=0.30", "safetensors", "pyyaml", "pillow", "deepspeed", "matplotlib"],
        "dali": ["nvidia-dali-cuda130"],
        "dev": ["pytest", "ninja", "ruff"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
