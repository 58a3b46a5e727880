"""Triton kernels of the multi-scale DreamTeacher loss (DESIGN.md section 3): forward and backward, all levels.

Contract (docs/ARCHITECTURE.md, dtfast.ops): ``dreamteacher_loss_forward(student, teacher, whiten, at_mode) ->
(mse fp32[L], at fp32[L], saved)`` and ``dreamteacher_loss_backward(grad_mse, grad_at, student, teacher, saved,
whiten, at_mode) -> [ds_l]``. whiten: 0 channel / 1 sample; at_mode: 0 paper / 1 code.

Design (memory-bound): work items are (level, sample, pixel tile) on a 1-D grid; per-level metadata (element
offsets of each map relative to a base map, B, C, HW, buffer offsets) lives in one small int64 tensor, so the
number of launches does not depend on L: forward = one main launch per layout group + 2 small reductions,
backward = one launch per layout group (a group = levels sharing dtype and student/teacher memory format; one
group in practice).
- Forward main: streams s and g once, in fp32. NCHW (tiled like the CUDA C++ column kernel): each program owns
  BLOCK_P = 128 contiguous pixels and walks the channels in [BLOCK_C, BLOCK_P] tiles (16-byte vectors along the
  pixels, UNROLL tiles' loads issued before their arithmetic), accumulating per element s, s^2, d, d^2, s*d, g^2
  with d = g - shift (shift: per-pixel mean of g over the first BLOCK_C channels), reduced over the tile rows once
  at the end; work items are ordered largest C first (longest programs first: no tail).
  channels_last: one pixel per thread, BLOCK_C contiguous channels per vector load, chunks merged with Chan's
  formulas in registers (no cross-thread reductions in the loop). From these moments, per pixel:
  sum_c (s - W(g))^2 = S_ss - 2 r C_sg + r^2 M2_g, q_s = S_ss, q_g = S_gg (summed the same way as S_ss, so s = k*g
  gives exactly zero AT). Channel mode stores (q_s, q_g, mu, rstd) per pixel; sample mode stores (q_s, q_g) and
  per-tile moments (merged per sample in the next stage).
- Forward per sample (``_loss_reduce.py``): merges tile moments (sample whitening), norms of q_s, q_g, and the exact
  ||qhat_s - qhat_g|| and <qhat_s, qhat_s - qhat_g> from the stored q's (no cancellation). Per level: sums.
- Backward: ds = alpha[p] * s - beta[p] * (g - mu), with per-pixel alpha/beta from the saved statistics; it
  reads s and g once and writes ds once. NCHW work items are (sample, chunk of BWD_CHUNK channels, pixel tile):
  many short equal programs, [BWD_ROWS, BLOCK_P] tiles (all loads of a tile in flight at once).
saved = [pixel_stats, sample_stats]: fp32, (2 or 4) * B * HW + 8 * B floats per level.
Memory layouts: each map must be NCHW-contiguous or channels_last-contiguous (other strides are copied with
``.contiguous()`` first); loads are vectorised along the contiguous dimension. fp32/bf16/fp16 in, fp32 math.
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); cross-tensor element offsets need the maps in
host memory then, so the interpreter path takes CPU tensors only.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._loss_meta import META, NUM_WARPS, PIX_PLANES, SAMPLE_STATS, prepare  # noqa: F401 (aot_check)
from ._loss_reduce import _find_level, _fwd_level_kernel, _fwd_sample_kernel

WHITEN_EPS = 1e-6
NORM_EPS = 1e-12


@triton.jit
def _offs_2d(base, c, p, C, HW, CL: tl.constexpr, ALIGN: tl.constexpr):
    # offsets of channels c ([1, BLOCK_C]) at pixels p ([BLOCK_P]) -> [BLOCK_P, BLOCK_C]; channels_last rows are
    # contiguous along c
    if CL:
        row = base + p * C
        if ALIGN > 1:
            row = tl.multiple_of(row, ALIGN)
        offs = row[:, None] + c
    else:
        offs = base + c * HW + p[:, None]
    return offs


@triton.jit
def _offs_t(base, c, pp, C, HW, CL: tl.constexpr, ALIGN: tl.constexpr):
    # offsets of channels c ([BLOCK_C, 1]) at pixels pp ([1, BLOCK_P]) -> [BLOCK_C, BLOCK_P] (NCHW tiles: rows
    # contiguous along the pixels; a channels_last teacher is gathered with the same tile)
    if CL:
        offs = base + pp * C + c
    else:
        row = base + c * HW
        if ALIGN > 1:
            # [ALIGN, ALIGN], not [ALIGN, 1]: the size-1 pixel dim is broadcast along the tile, and triton 3.6 (the
            # GPU machine's) carries that dim's divisibility into the broadcast, so with 1 no NCHW load was vectorised
            # there (triton 3.8 vectorised either way; test_kernels_vectorise_with_the_gpu_machines_triton)
            row = tl.multiple_of(row, [ALIGN, ALIGN])
        offs = row + pp
    return offs


@triton.jit
def _tile(s, g, shift, a_s, a_ss, a_d, a_dd, a_sd, a_gg):
    # one loaded [BLOCK_C, BLOCK_P] tile (padding loaded as 0, shift 0 there) into the per-element sums
    s = s.to(tl.float32)
    g = g.to(tl.float32)
    return _sums(s, g, g - shift, a_s, a_ss, a_d, a_dd, a_sd, a_gg)


@triton.jit
def _sums(s, g, d, a_s, a_ss, a_d, a_dd, a_sd, a_gg):
    # one [BLOCK_C, BLOCK_P] tile into the per-element shifted sums (d = g - shift, 0 outside the map)
    a_s += s
    a_ss += s * s
    a_d += d
    a_dd += d * d
    a_sd += s * d
    a_gg += g * g
    return a_s, a_ss, a_d, a_dd, a_sd, a_gg


@triton.jit
def _load4(s_ptr, g_ptr, s_base, g_base, ca, pp, C, HW, pm2, G_CL: tl.constexpr, ALIGN: tl.constexpr,
           BLOCK_C: tl.constexpr, N: tl.constexpr):
    # the first min(N, 4) NCHW [BLOCK_C, BLOCK_P] tiles of s and g from channel rows ca (unused ones: the first tile)
    s0 = tl.load(s_ptr + _offs_t(s_base, ca, pp, C, HW, False, ALIGN), mask=pm2, other=0.0)
    g0 = tl.load(g_ptr + _offs_t(g_base, ca, pp, C, HW, G_CL, ALIGN), mask=pm2, other=0.0)
    s1, g1, s2, g2, s3, g3 = s0, g0, s0, g0, s0, g0
    if N > 1:
        c1 = ca + BLOCK_C
        s1 = tl.load(s_ptr + _offs_t(s_base, c1, pp, C, HW, False, ALIGN), mask=pm2, other=0.0)
        g1 = tl.load(g_ptr + _offs_t(g_base, c1, pp, C, HW, G_CL, ALIGN), mask=pm2, other=0.0)
    if N > 2:
        c2 = ca + 2 * BLOCK_C
        c3 = ca + 3 * BLOCK_C
        s2 = tl.load(s_ptr + _offs_t(s_base, c2, pp, C, HW, False, ALIGN), mask=pm2, other=0.0)
        g2 = tl.load(g_ptr + _offs_t(g_base, c2, pp, C, HW, G_CL, ALIGN), mask=pm2, other=0.0)
        s3 = tl.load(s_ptr + _offs_t(s_base, c3, pp, C, HW, False, ALIGN), mask=pm2, other=0.0)
        g3 = tl.load(g_ptr + _offs_t(g_base, c3, pp, C, HW, G_CL, ALIGN), mask=pm2, other=0.0)
    return s0, g0, s1, g1, s2, g2, s3, g3


@triton.jit
def _tiles4(s0, g0, s1, g1, s2, g2, s3, g3, sh2, a_s, a_ss, a_d, a_dd, a_sd, a_gg, N: tl.constexpr):
    # the first min(N, 4) loaded tiles into the per-element sums
    a_s, a_ss, a_d, a_dd, a_sd, a_gg = _tile(s0, g0, sh2, a_s, a_ss, a_d, a_dd, a_sd, a_gg)
    if N > 1:
        a_s, a_ss, a_d, a_dd, a_sd, a_gg = _tile(s1, g1, sh2, a_s, a_ss, a_d, a_dd, a_sd, a_gg)
    if N > 2:
        a_s, a_ss, a_d, a_dd, a_sd, a_gg = _tile(s2, g2, sh2, a_s, a_ss, a_d, a_dd, a_sd, a_gg)
        a_s, a_ss, a_d, a_dd, a_sd, a_gg = _tile(s3, g3, sh2, a_s, a_ss, a_d, a_dd, a_sd, a_gg)
    return a_s, a_ss, a_d, a_dd, a_sd, a_gg


@triton.jit
def _chan(s, g, cmask, n_c, n, mean_g, m2_g, mean_s, co_sg, ss_s, ss_g):
    # a [BLOCK_P, BLOCK_C] chunk (channels held by one thread) merged into the per-pixel moments (Chan et al.)
    cm_g = tl.sum(g, axis=1) / n_c
    cm_s = tl.sum(s, axis=1) / n_c
    dg = tl.where(cmask, g - cm_g[:, None], 0.0)
    dsm = tl.where(cmask, s - cm_s[:, None], 0.0)
    n_new = n + n_c
    w = n * n_c / n_new
    delta_g = cm_g - mean_g
    delta_s = cm_s - mean_s
    m2_g += tl.sum(dg * dg, axis=1) + delta_g * delta_g * w
    co_sg += tl.sum(dsm * dg, axis=1) + delta_s * delta_g * w
    mean_g += delta_g * (n_c / n_new)
    mean_s += delta_s * (n_c / n_new)
    ss_s += tl.sum(s * s, axis=1)
    ss_g += tl.sum(g * g, axis=1)
    return n_new, mean_g, m2_g, mean_s, co_sg, ss_s, ss_g


@triton.jit
def _work_item(meta_ptr, pid, num_levels, group, START: tl.constexpr, COUNT: tl.constexpr, LP: tl.constexpr,
               ALIGN: tl.constexpr):
    # program pid's level (its meta row: columns START / COUNT hold the level's first program and program count),
    # the level's offsets and sizes, and pid's work item within the level. The alignment hints stay here, on the
    # loads: tl.multiple_of marks the op defining its value, and a value returned from here is defined by the call,
    # whose marks inlining drops (the sm_90 check then finds no vectorised loads)
    lvl = _find_level(meta_ptr, pid, num_levels, group, START, COUNT, LP)
    row = meta_ptr + lvl * 16
    C = tl.load(row + 3)
    HW = tl.load(row + 4)
    if ALIGN > 1:
        C = tl.multiple_of(C, ALIGN)
        HW = tl.multiple_of(HW, ALIGN)
    return (lvl, row, tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), C, HW, tl.load(row + 7),
            pid - tl.load(row + START))


@triton.jit
def _fwd_main_kernel(s_ptr, g_ptr, meta_ptr, pix_ptr, part_ptr, num_levels, group, tune_key,
                     WHITEN: tl.constexpr, S_CL: tl.constexpr, G_CL: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, UNROLL: tl.constexpr, LP: tl.constexpr,
                     EPS: tl.constexpr):
    pid = tl.program_id(0)
    lvl, row, s_off, g_off, B, C, HW, n_tiles, item = _work_item(meta_ptr, pid, num_levels, group, 6, 5, LP, ALIGN)
    b = item // n_tiles
    tile = item - b * n_tiles
    s_base = s_off + b * C * HW
    g_base = g_off + b * C * HW
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW

    mean_g = tl.zeros([BLOCK_P], dtype=tl.float32)
    m2_g = tl.zeros([BLOCK_P], dtype=tl.float32)
    mean_s = tl.zeros([BLOCK_P], dtype=tl.float32)
    co_sg = tl.zeros([BLOCK_P], dtype=tl.float32)
    ss_s = tl.zeros([BLOCK_P], dtype=tl.float32)
    ss_g = tl.zeros([BLOCK_P], dtype=tl.float32)
    if S_CL:
        # one pixel per thread, BLOCK_C contiguous channels per load
        pm2 = pmask[:, None]
        cv = tl.arange(0, BLOCK_C)[None, :]
        n = 0.0
        c_main = C - C % (BLOCK_C * UNROLL)
        for c0 in range(0, c_main, BLOCK_C * UNROLL):
            for u in tl.static_range(UNROLL):
                c = c0 + u * BLOCK_C + cv
                s = tl.load(s_ptr + _offs_2d(s_base, c, p, C, HW, True, ALIGN), mask=pm2, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + _offs_2d(g_base, c, p, C, HW, G_CL, ALIGN), mask=pm2, other=0.0).to(tl.float32)
                n, mean_g, m2_g, mean_s, co_sg, ss_s, ss_g = _chan(s, g, cv < BLOCK_C, BLOCK_C * 1.0, n, mean_g,
                                                                   m2_g, mean_s, co_sg, ss_s, ss_g)
        for c0 in range(c_main, C, BLOCK_C):
            c = c0 + cv
            cmask = c < C
            m = pm2 & cmask
            s = tl.load(s_ptr + _offs_2d(s_base, c, p, C, HW, True, 1), mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + _offs_2d(g_base, c, p, C, HW, G_CL, 1), mask=m, other=0.0).to(tl.float32)
            n_c = tl.minimum(C - c0, BLOCK_C).to(tl.float32)
            n, mean_g, m2_g, mean_s, co_sg, ss_s, ss_g = _chan(s, g, cmask, n_c, n, mean_g, m2_g, mean_s, co_sg,
                                                               ss_s, ss_g)
    else:
        # BLOCK_P contiguous pixels per program, [BLOCK_C, BLOCK_P] tiles (UNROLL per iteration, loads first),
        # per-element fp32 sums of s, s^2, d, d^2, s*d, g^2 with d = g - shift (shifted: little cancellation in the
        # variance), reduced over the BLOCK_C rows once at the end (as the CUDA C++ column kernel)
        ch = tl.arange(0, BLOCK_C)[:, None]
        pp = p[None, :]
        pm2 = pmask[None, :]
        # shift = per-pixel mean of g over the first BLOCK_C channels: close to the channel mean, so the shifted
        # second moment d^2 has little cancellation (a single channel as shift can be several std away)
        mf = pm2 & (ch < C)
        g_first = tl.load(g_ptr + _offs_t(g_base, ch, pp, C, HW, G_CL, ALIGN), mask=mf, other=0.0).to(tl.float32)
        shift = tl.sum(g_first, axis=0) / tl.minimum(C, BLOCK_C).to(tl.float32)
        sh2 = shift[None, :]
        a_s = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        a_ss = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        a_d = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        a_dd = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        a_sd = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        a_gg = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        c_main = C - C % (BLOCK_C * UNROLL)
        for c0 in range(0, c_main, BLOCK_C * UNROLL):
            # all UNROLL tiles' loads are issued before the arithmetic (memory-level parallelism); UNROLL in 1, 2, 4, 8.
            # More tiles in flight per thread cost registers (occupancy): the autotuner picks.
            ca = c0 + ch
            s0, g0, s1, g1, s2, g2, s3, g3 = _load4(s_ptr, g_ptr, s_base, g_base, ca, pp, C, HW, pm2, G_CL, ALIGN,
                                                    BLOCK_C, UNROLL)
            if UNROLL > 4:
                s4, g4, s5, g5, s6, g6, s7, g7 = _load4(s_ptr, g_ptr, s_base, g_base, ca + 4 * BLOCK_C, pp, C, HW, pm2,
                                                        G_CL, ALIGN, BLOCK_C, 4)
            a_s, a_ss, a_d, a_dd, a_sd, a_gg = _tiles4(s0, g0, s1, g1, s2, g2, s3, g3, sh2, a_s, a_ss, a_d, a_dd, a_sd,
                                                       a_gg, UNROLL)
            if UNROLL > 4:
                a_s, a_ss, a_d, a_dd, a_sd, a_gg = _tiles4(s4, g4, s5, g5, s6, g6, s7, g7, sh2, a_s, a_ss, a_d, a_dd,
                                                           a_sd, a_gg, 4)
        for c0 in range(c_main, C, BLOCK_C):
            c = c0 + ch
            m = pm2 & (c < C)
            s = tl.load(s_ptr + _offs_t(s_base, c, pp, C, HW, False, ALIGN), mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + _offs_t(g_base, c, pp, C, HW, G_CL, ALIGN), mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, g - sh2, 0.0)
            a_s, a_ss, a_d, a_dd, a_sd, a_gg = _sums(s, g, d, a_s, a_ss, a_d, a_dd, a_sd, a_gg)
        Cn = C.to(tl.float32)
        sum_s = tl.sum(a_s, axis=0)
        sum_d = tl.sum(a_d, axis=0)
        md = sum_d / Cn
        mean_g = shift + md
        m2_g = tl.maximum(tl.sum(a_dd, axis=0) - sum_d * md, 0.0)
        mean_s = sum_s / Cn
        co_sg = tl.sum(a_sd, axis=0) - sum_s * md
        ss_s = tl.sum(a_ss, axis=0)
        ss_g = tl.sum(a_gg, axis=0)

    Cf = C.to(tl.float32)
    plane = B * HW
    pix = pix_ptr + tl.load(row + 8) + b * HW + p
    tl.store(pix, ss_s, mask=pmask)
    tl.store(pix + plane, ss_g, mask=pmask)
    part = part_ptr + tl.load(row + 9) + b * n_tiles + tile
    nplane = B * n_tiles
    if WHITEN == 0:
        # sum_c (s - (g - mu) r)^2 = S_ss - 2 r C_sg + r^2 M2_g
        rstd = 1.0 / tl.sqrt(m2_g / Cf + EPS)
        sq_err = tl.maximum(ss_s - 2.0 * rstd * co_sg + rstd * rstd * m2_g, 0.0)  # cancels in fp32: never < 0
        tl.store(pix + 2 * plane, mean_g, mask=pmask)
        tl.store(pix + 3 * plane, rstd, mask=pmask)
        tl.store(part, tl.sum(tl.where(pmask, sq_err, 0.0), axis=0))
    else:
        # moments of this tile over (C, pixels), merged from the per-pixel moments
        n_pix = tl.sum(pmask.to(tl.float32), axis=0)
        tm_g = tl.sum(tl.where(pmask, mean_g, 0.0), axis=0) / n_pix
        tm_s = tl.sum(tl.where(pmask, mean_s, 0.0), axis=0) / n_pix
        dpg = tl.where(pmask, mean_g - tm_g, 0.0)
        dps = tl.where(pmask, mean_s - tm_s, 0.0)
        tl.store(part, Cf * n_pix)
        tl.store(part + nplane, tm_g)
        tl.store(part + 2 * nplane, tl.sum(tl.where(pmask, m2_g, 0.0), axis=0) + Cf * tl.sum(dpg * dpg, axis=0))
        tl.store(part + 3 * nplane, tm_s)
        tl.store(part + 4 * nplane, tl.sum(tl.where(pmask, co_sg, 0.0), axis=0) + Cf * tl.sum(dps * dpg, axis=0))
        tl.store(part + 5 * nplane, tl.sum(tl.where(pmask, ss_s, 0.0), axis=0))


@triton.jit
def _bwd_kernel(s_ptr, g_ptr, ds_ptr, meta_ptr, pix_ptr, samp_ptr, gmse_ptr, gat_ptr, g_stride, gm_scale, ga_scale,
                num_levels, group, tune_key,
                WHITEN: tl.constexpr, AT_MODE: tl.constexpr, S_CL: tl.constexpr, G_CL: tl.constexpr,
                ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, UNROLL: tl.constexpr,
                CHUNK: tl.constexpr, BWD_ROWS: tl.constexpr, LP: tl.constexpr, NORM_EPS: tl.constexpr):
    pid = tl.program_id(0)
    lvl, row, s_off, g_off, B, C, HW, n_tiles, item = _work_item(meta_ptr, pid, num_levels, group, 13, 14, LP,
                                                                 ALIGN)
    ds_off = tl.load(row + 12)
    # work item = (sample, channel chunk, pixel tile); channels_last programs take all channels (one chunk)
    per_sample = tl.load(row + 14) // B
    b = item // per_sample
    rem = item - b * per_sample
    chunk = rem // n_tiles
    tile = rem - chunk * n_tiles
    # per-level output gradients (g_stride 1), or one scalar loss gradient scaled per term (g_stride 0)
    gm = tl.load(gmse_ptr + lvl * g_stride) * gm_scale
    ga = tl.load(gat_ptr + lvl * g_stride) * ga_scale
    samp = samp_ptr + tl.load(row + 10) + b * 8
    ns = tl.load(samp + 2)
    ng = tl.load(samp + 3)
    dnorm = tl.load(samp + 4)
    sd = tl.load(samp + 5)

    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    plane = B * HW
    pix = pix_ptr + tl.load(row + 8) + b * HW + p
    qhs = tl.load(pix, mask=pmask, other=0.0) / tl.maximum(ns, NORM_EPS)
    d = qhs - tl.load(pix + plane, mask=pmask, other=0.0) / tl.maximum(ng, NORM_EPS)
    Bf = B.to(tl.float32)
    Cf = C.to(tl.float32)
    HWf = HW.to(tl.float32)
    if AT_MODE == 0:
        cv = tl.where(dnorm > 0.0, ga / (Bf * tl.where(dnorm > 0.0, dnorm, 1.0)), 0.0)
    else:
        cv = 2.0 * ga / (Bf * HWf)
    v = cv * d
    if ns > NORM_EPS:
        dq = (v - qhs * (cv * sd)) / ns
    else:
        dq = v / NORM_EPS
    two_gm_n = 2.0 * gm / (Bf * Cf * HWf)
    alpha = two_gm_n + 2.0 * dq
    if WHITEN == 0:
        mu = tl.load(pix + 2 * plane, mask=pmask, other=0.0)
        beta = two_gm_n * tl.load(pix + 3 * plane, mask=pmask, other=0.0)
    else:
        mu = tl.zeros([BLOCK_P], dtype=tl.float32) + tl.load(samp + 6)
        beta = tl.zeros([BLOCK_P], dtype=tl.float32) + two_gm_n * tl.load(samp + 7)

    s_base = s_off + b * C * HW
    g_base = g_off + b * C * HW
    d_base = ds_off + b * C * HW
    if S_CL:
        pm2 = pmask[:, None]
        lane = tl.arange(0, BLOCK_C)[None, :]
        a2 = alpha[:, None]
        b2 = beta[:, None]
        mu2 = mu[:, None]
        c_main = C - C % (BLOCK_C * UNROLL)
        for c0 in range(0, c_main, BLOCK_C * UNROLL):
            for u in tl.static_range(UNROLL):
                c = c0 + u * BLOCK_C + lane
                s = tl.load(s_ptr + _offs_2d(s_base, c, p, C, HW, True, ALIGN), mask=pm2, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + _offs_2d(g_base, c, p, C, HW, G_CL, ALIGN), mask=pm2, other=0.0).to(tl.float32)
                grad = a2 * s - b2 * (g - mu2)
                tl.store(ds_ptr + _offs_2d(d_base, c, p, C, HW, True, ALIGN), grad.to(ds_ptr.dtype.element_ty),
                         mask=pm2)
        for c0 in range(c_main, C, BLOCK_C):
            c = c0 + lane
            m = pm2 & (c < C)
            s = tl.load(s_ptr + _offs_2d(s_base, c, p, C, HW, True, 1), mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + _offs_2d(g_base, c, p, C, HW, G_CL, 1), mask=m, other=0.0).to(tl.float32)
            grad = a2 * s - b2 * (g - mu2)
            tl.store(ds_ptr + _offs_2d(d_base, c, p, C, HW, True, 1), grad.to(ds_ptr.dtype.element_ty), mask=m)
    else:
        # [BWD_ROWS, BLOCK_P] tiles over this program's CHUNK channels (no accumulators here, so a tall tile: all
        # its loads in flight at once); per-pixel coefficients broadcast over the rows
        ch = tl.arange(0, BWD_ROWS)[:, None]
        pp = p[None, :]
        pm2 = pmask[None, :]
        a2 = alpha[None, :]
        b2 = beta[None, :]
        mu2 = mu[None, :]
        c_lo = chunk * CHUNK
        c_hi = tl.minimum(c_lo + CHUNK, C)
        for c0 in range(c_lo, c_hi, BWD_ROWS):
            c = c0 + ch
            m = pm2 & (c < c_hi)
            s = tl.load(s_ptr + _offs_t(s_base, c, pp, C, HW, False, ALIGN), mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + _offs_t(g_base, c, pp, C, HW, G_CL, ALIGN), mask=m, other=0.0).to(tl.float32)
            grad = a2 * s - b2 * (g - mu2)
            tl.store(ds_ptr + _offs_t(d_base, c, pp, C, HW, False, ALIGN), grad.to(ds_ptr.dtype.element_ty), mask=m)


# NCHW tiles: autotuned on the GPU over a few configurations around the CUDA C++ kernel's (128 pixels, 16-byte loads),
# keyed per group on the level shapes, dtype and flags. The grid depends only on BLOCK_P (fixed), and both kernels
# only store (no accumulation into outputs), so re-running a configuration while tuning is harmless. Under the
# interpreter a single configuration (no benchmarking). Every configuration is compiled by aot_check.py.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if _INTERPRET:
    from . import _interpreter_compat

    _interpreter_compat.apply()  # triton 3.6 + NumPy >= 2.5: runtime loop bounds
# (BLOCK_C, UNROLL, num_warps); first = default
FWD_NCHW_CONFIGS = [(8, 4, 4), (8, 2, 4), (16, 2, 8), (16, 4, 8), (8, 8, 4), (8, 8, 8)]
BWD_NCHW_CONFIGS = [(32, 4), (16, 4), (64, 8), (32, 8), (64, 4)]  # (BWD_ROWS, num_warps)
_FWD_KEY = ["tune_key", "WHITEN", "G_CL", "ALIGN"]
_BWD_KEY = ["tune_key", "WHITEN", "AT_MODE", "G_CL", "ALIGN"]
_fwd_main_nchw = triton.autotune(
    configs=[triton.Config({"BLOCK_C": bc, "UNROLL": u}, num_warps=w)
             for bc, u, w in (FWD_NCHW_CONFIGS[:1] if _INTERPRET else FWD_NCHW_CONFIGS)],
    key=_FWD_KEY)(_fwd_main_kernel)
_bwd_nchw = triton.autotune(
    configs=[triton.Config({"BWD_ROWS": r}, num_warps=w)
             for r, w in (BWD_NCHW_CONFIGS[:1] if _INTERPRET else BWD_NCHW_CONFIGS)],
    key=_BWD_KEY)(_bwd_kernel)


def _on_device(device: torch.device):
    # Triton launches on the current CUDA device: make it the maps' device
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dreamteacher_loss_forward(student: list[Tensor], teacher: list[Tensor], whiten: int,
                              at_mode: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Per-level (mse fp32[L], at fp32[L], saved=[pixel_stats, sample_stats]) for all levels at once."""
    with _on_device(student[0].device):
        _, mse, at, saved = _forward(student, teacher, whiten, at_mode, 0.0)
    return mse, at, saved


def dreamteacher_loss_forward_total(student: list[Tensor], teacher: list[Tensor], whiten: int, at_mode: int,
                                    at_weight: float) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(loss, mse, at, saved): the forward above plus the total ``mean_l(mse_l + at_weight * at_l)`` (fp32 scalar),
    computed by the last forward kernel (no extra launch)."""
    with _on_device(student[0].device):
        return _forward(student, teacher, whiten, at_mode, float(at_weight))


def dreamteacher_loss_backward(grad_mse: Tensor, grad_at: Tensor, student: list[Tensor], teacher: list[Tensor],
                               saved: list[Tensor], whiten: int, at_mode: int, *,
                               flat_grads: bool = False) -> list[Tensor]:
    """Gradients of sum_l (grad_mse[l] * mse_l + grad_at[l] * at_l) w.r.t. each student map (same layout).

    ``flat_grads=True``: the gradients of levels sharing dtype and layouts are views into one buffer (one allocation,
    metadata reused from the forward: the cheapest on the host). The buffer lives until its last view is freed, and
    the views alias each other's storage, which torch custom ops may not return: the default allocates each map."""
    with _on_device(student[0].device):
        device = student[0].device
        grad_mse, grad_at = _f32_on(grad_mse, device), _f32_on(grad_at, device)
        return _backward((grad_mse, grad_at, 1, 1.0, 1.0), student, teacher, saved, whiten, at_mode, flat_grads)


def dreamteacher_loss_backward_total(grad_loss: Tensor, at_weight: float, student: list[Tensor], teacher: list[Tensor],
                                     saved: list[Tensor], whiten: int, at_mode: int, *,
                                     flat_grads: bool = False) -> list[Tensor]:
    """Gradients of ``grad_loss * mean_l(mse_l + at_weight * at_l)`` (grad_loss: one element, on the maps' device):
    the kernel scales the scalar itself (grad_mse[l] = grad_loss / L, grad_at[l] = at_weight * grad_loss / L), so no
    per-level gradient tensors are built on the host."""
    with _on_device(student[0].device):
        g = _f32_on(grad_loss.reshape(1), student[0].device)
        L = len(student)
        return _backward((g, g, 0, 1.0 / L, float(at_weight) / L), student, teacher, saved, whiten, at_mode,
                         flat_grads)


def _launch_tuned(tuner, kernel, grid, args, opts, memo, key):
    """Launch an autotuned kernel; once the autotuner has chosen for this plan's key, launch its kernel directly with
    the chosen configuration (memoised per plan: skips the autotuner's per-call key building, ~9 us per launch on a
    2-vCPU VM). The autotuner's own cache fixes a key's choice for good, so this launches the same compiled kernel."""
    tuned = memo.get(key)
    if tuned is not None:
        kernel[grid](*args, **tuned)
        return
    tuner[grid](*args, **opts)
    best = getattr(tuner, "best_config", None)  # the configuration of the launch that just ran
    if best is not None and hasattr(best, "all_kwargs"):
        memo[key] = {**opts, **best.all_kwargs()}


def _launches(plan, build, at_mode):
    """``build(plan, at_mode)``, computed once per plan and at_mode (memoised in ``plan.extra``)."""
    key = (build.__name__, at_mode)
    found = plan.extra.get(key)
    return found if found is not None else plan.extra.setdefault(key, build(plan, at_mode))


def _build_fwd(plan, at_mode):
    """([(grid, args after the pointers, kwargs)] of the forward main kernel per group, the sample and level kernels'
    kwargs)."""
    L = plan.num_levels
    LP = triton.next_power_of_2(L)
    mains = []
    for gid, grp in enumerate(plan.groups):
        opts = dict(WHITEN=plan.whiten, S_CL=grp.s_cl, G_CL=grp.g_cl, ALIGN=grp.align, BLOCK_P=grp.block_p, LP=LP,
                    EPS=WHITEN_EPS)
        if grp.s_cl:
            opts.update(BLOCK_C=grp.block_c, UNROLL=grp.unroll, num_warps=grp.num_warps)
        # NCHW: the tile ([BLOCK_C, 128], UNROLL, warps) is autotuned on the GPU; the grid does not depend on it
        mains.append(((grp.num_items,), (L, gid, grp.tune_key), opts))
    # one program per sample; wide blocks keep its loops over pixels and tiles to one or two iterations
    block = max(min(triton.next_power_of_2(max(row[4] for row in plan.rows)), 2048), 128)
    block_t = max(min(triton.next_power_of_2(max(row[7] for row in plan.rows)), 256), 16)
    sample = dict(WHITEN=plan.whiten, AT_MODE=at_mode, BLOCK=block, BLOCK_T=block_t, LP=LP, EPS=WHITEN_EPS,
                  NORM_EPS=NORM_EPS, num_warps=8 if block >= 1024 else 4)
    level = dict(AT_MODE=at_mode, BLOCK=128, num_warps=4)  # one program for all levels
    return mains, sample, level


def _forward(student, teacher, whiten, at_mode, at_weight):
    plan, s_list, g_list = prepare(student, teacher, whiten)
    device = plan.device
    L = plan.num_levels
    pix = torch.empty(plan.pix_size, dtype=torch.float32, device=device)
    part = torch.empty(plan.part_size, dtype=torch.float32, device=device)
    samp = torch.empty(plan.samp_size, dtype=torch.float32, device=device)
    mse = torch.empty(L, dtype=torch.float32, device=device)
    at = torch.empty(L, dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    meta = plan.meta_tensor()
    mains, sample, level = _launches(plan, _build_fwd, at_mode)
    for gid, ((grid, tail, opts), grp) in enumerate(zip(mains, plan.groups)):
        lvl = grp.levels[0]
        args = (s_list[lvl], g_list[lvl], meta, pix, part, *tail)
        if grp.s_cl:
            _fwd_main_kernel[grid](*args, **opts)
        else:
            _launch_tuned(_fwd_main_nchw, _fwd_main_kernel, grid, args, opts, plan.extra, ("fwd_tuned", gid))
    _fwd_sample_kernel[(plan.num_samples,)](meta, pix, part, samp, L, **sample)
    _fwd_level_kernel[(1,)](meta, samp, mse, at, loss, L, at_weight, **level)
    return loss, mse, at, [pix, samp]


def _build_bwd(plan, at_mode):
    """[(grid, args after the pointers, kwargs without ALIGN)] of the backward per group."""
    L = plan.num_levels
    LP = triton.next_power_of_2(L)
    found = []
    for gid, grp in enumerate(plan.groups):
        opts = dict(WHITEN=plan.whiten, AT_MODE=at_mode, S_CL=grp.s_cl, G_CL=grp.g_cl, BLOCK_C=grp.block_c,
                    BLOCK_P=grp.block_p, UNROLL=grp.unroll, CHUNK=max(grp.bwd_chunk, 1), LP=LP, NORM_EPS=NORM_EPS)
        if grp.s_cl:
            opts.update(BWD_ROWS=grp.bwd_rows, num_warps=grp.num_warps)
        # NCHW: BWD_ROWS and warps autotuned on the GPU (the grid does not depend on them)
        found.append(((grp.num_bwd_items,), (L, gid, grp.tune_key), opts))
    return found


def _f32_on(x: Tensor, device: torch.device) -> Tensor:
    """``x`` as a contiguous float32 tensor on ``device`` (itself when it already is: no copy, no op)."""
    if x.dtype == torch.float32 and x.device == device and x.is_contiguous():
        return x
    return x.to(device=device, dtype=torch.float32).contiguous()


def _backward(grad_out, student, teacher, saved, whiten, at_mode, flat_grads=False):
    """grad_out = (grad_mse fp32, grad_at fp32, level stride (1, or 0 for one scalar), mse scale, at scale)."""
    plan, s_list, g_list = prepare(student, teacher, whiten)
    if flat_grads:
        bases, grads = plan.flat_grads()
        meta = plan.meta_tensor()
        aligns = [grp.align if base.data_ptr() % 16 == 0 else 1 for grp, base in zip(plan.groups, bases)]
    else:
        grads = [torch.empty_like(s) for s in s_list]
        bases = [grads[grp.levels[0]] for grp in plan.groups]
        meta, aligns = plan.grad_meta(grads)
    pix, samp = saved
    launches = _launches(plan, _build_bwd, at_mode)
    for gid, ((grid, tail, opts), grp, base, align) in enumerate(zip(launches, plan.groups, bases, aligns)):
        lvl = grp.levels[0]
        args = (s_list[lvl], g_list[lvl], base, meta, pix, samp, *grad_out, *tail)
        if grp.s_cl:
            _bwd_kernel[grid](*args, ALIGN=align, **opts)
        else:
            _launch_tuned(_bwd_nchw, _bwd_kernel, grid, args, dict(opts, ALIGN=align), plan.extra,
                          ("bwd_tuned", gid, at_mode, align))
    return grads


__all__ = ["META", "PIX_PLANES", "SAMPLE_STATS", "dreamteacher_loss_backward", "dreamteacher_loss_backward_total",
           "dreamteacher_loss_forward", "dreamteacher_loss_forward_total"]
