"""Compile the loss kernels ahead of time for a CUDA target without a GPU and report what the compiler made.

    python -m dtfast.kernels.aot_check [--arch 90]        (or: python dtfast/kernels/aot_check.py from a checkout)

Catches kernels that only work in the interpreter, and shows per variant the registers, spills and whether the
global loads are vectorised (``ld.global.v*``). Needs Triton's NVIDIA backend (ptxas ships with it); must run with
TRITON_INTERPRET unset. Exit status 1 if a variant fails to compile or an aligned variant is not vectorised.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from dtfast.kernels import dreamteacher_loss as K
    from dtfast.kernels._loss_meta import tile_config
    from dtfast.kernels._loss_reduce import _fwd_level_kernel, _fwd_sample_kernel
else:
    from . import dreamteacher_loss as K
    from ._loss_meta import tile_config
    from ._loss_reduce import _fwd_level_kernel, _fwd_sample_kernel


FLOAT_ARGS = ("at_weight", "gm_scale", "ga_scale")  # scalar float arguments (the other scalars are i32)


def compile_kernel(fn, dtype: str, constexprs: dict, arch: int, num_warps: int = K.NUM_WARPS):
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("s_ptr", "g_ptr", "ds_ptr"):
            signature[name] = "*" + dtype
        elif name == "meta_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if name.endswith("_ptr"):  # what the launcher's specialisation gives 16-byte aligned tensors
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def ptxas_info(ptx: str, arch: int) -> str:
    exe = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    if not exe:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run([exe[0], f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=False)
    return "; ".join(line.split("info    :")[-1].strip() for line in res.stderr.splitlines() if "Used" in line or
                     "spill" in line)


def variants():
    for dtype in ("bf16", "fp16", "fp32"):
        esize = 4 if dtype == "fp32" else 2
        for s_cl, g_cl in ((False, False), (True, True), (False, True)):
            for align in (16 // esize, 1):
                for whiten, at_mode in ((0, 0), (1, 1)):
                    block_c, block_p, unroll, warps, chunk, rows = tile_config(s_cl, esize)
                    want = align > 1 and s_cl == g_cl
                    # NCHW: every autotuning configuration; channels_last: the fixed tile
                    fwd_cfgs = [(block_c, unroll, warps)] if s_cl else K.FWD_NCHW_CONFIGS
                    bwd_cfgs = [(rows, warps)] if s_cl else K.BWD_NCHW_CONFIGS
                    for bc, u, w in fwd_cfgs:
                        tiles = dict(S_CL=s_cl, G_CL=g_cl, ALIGN=align, BLOCK_C=bc, BLOCK_P=block_p, UNROLL=u, LP=4)
                        yield (f"fwd {dtype} s_cl={s_cl} g_cl={g_cl} align={align} whiten={whiten} tile={bc}x{u}"
                               f" warps={w}", K._fwd_main_kernel, dtype, dict(WHITEN=whiten, EPS=1e-6, **tiles), want,
                               w)
                    for r, w in bwd_cfgs:
                        tiles = dict(S_CL=s_cl, G_CL=g_cl, ALIGN=align, BLOCK_C=block_c, BLOCK_P=block_p,
                                     UNROLL=unroll, LP=4, CHUNK=max(chunk, 1), BWD_ROWS=r)
                        yield (f"bwd {dtype} s_cl={s_cl} g_cl={g_cl} align={align} whiten={whiten} at={at_mode} "
                               f"rows={r} warps={w}", K._bwd_kernel, dtype,
                               dict(WHITEN=whiten, AT_MODE=at_mode, NORM_EPS=1e-12, **tiles), want, w)
    for whiten in (0, 1):
        for at_mode in (0, 1):
            yield (f"sample whiten={whiten} at={at_mode}", _fwd_sample_kernel, "fp32",
                   dict(WHITEN=whiten, AT_MODE=at_mode, BLOCK=2048, BLOCK_T=32, LP=4, EPS=1e-6, NORM_EPS=1e-12), False,
                   8)
    yield "level", _fwd_level_kernel, "fp32", dict(AT_MODE=0, BLOCK=128), False, 4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="only the aligned NCHW/channels_last bf16 variants")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2
    try:  # the ahead-of-time API (ASTSource attrs, GPUTarget) moves between Triton releases
        compile_kernel(_fwd_level_kernel, "fp32", {"AT_MODE": 0, "BLOCK": 128}, args.arch)
    except (TypeError, AttributeError, KeyError) as exc:
        print(f"aot_check: this Triton ({triton.__version__}) has another ahead-of-time API: {exc}")
        return 3
    failures = 0
    for name, fn, dtype, constexprs, want_vector, warps in variants():
        if args.quick and not (dtype == "bf16" and want_vector) and not name.startswith(("sample", "level")):
            continue
        try:
            kernel = compile_kernel(fn, dtype, constexprs, args.arch, warps)
        except Exception as exc:  # report every variant
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            continue
        ptx = kernel.asm["ptx"]
        vector = bool(re.search(r"ld\.global(\.\w+)*\.v[248]", ptx))
        v4 = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx))  # 16-byte loads
        bad = want_vector and not vector
        failures += bad
        print(f"{'FAIL' if bad else 'ok  '} {name}: vectorised={vector} 16B-loads={v4} {ptxas_info(ptx, args.arch)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
