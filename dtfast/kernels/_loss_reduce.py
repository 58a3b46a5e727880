"""Small per-sample and per-level stages of the Triton DreamTeacher loss (see dreamteacher_loss.py).

``_fwd_sample_kernel`` (one program per sample): merges the main kernel's per-tile moments (sample whitening),
takes the norms of the attention maps q_s, q_g and computes ||qhat_s - qhat_g|| and <qhat_s, qhat_s - qhat_g> from
the stored per-pixel q's (exact, no cancellation). ``_fwd_level_kernel`` (one program for all levels): sums over
the batch into mse[L], at[L], and the total loss mean_l(mse_l + at_weight * at_l) (so the eager loss needs no
composing ops). Both read only O(B*H*W) floats. ``_find_level`` maps a program id to its level.
"""

import triton
import triton.language as tl


@triton.jit
def _find_level(meta_ptr, pid, num_levels, group, START: tl.constexpr, COUNT: tl.constexpr, LP: tl.constexpr):
    lv = tl.arange(0, LP)
    lmask = lv < num_levels
    grp = tl.load(meta_ptr + lv * 16 + 15, mask=lmask, other=-1)
    start = tl.load(meta_ptr + lv * 16 + START, mask=lmask, other=0)
    count = tl.load(meta_ptr + lv * 16 + COUNT, mask=lmask, other=0)
    hit = ((grp == group) | (group < 0)) & (start <= pid) & (pid < start + count)
    return tl.sum(tl.where(hit, lv, 0), axis=0)


@triton.jit
def _fwd_sample_kernel(meta_ptr, pix_ptr, part_ptr, samp_ptr, num_levels,
                       WHITEN: tl.constexpr, AT_MODE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
                       LP: tl.constexpr, EPS: tl.constexpr, NORM_EPS: tl.constexpr):
    pid = tl.program_id(0)
    lvl = _find_level(meta_ptr, pid, num_levels, -1, 11, 2, LP)
    row = meta_ptr + lvl * 16
    B = tl.load(row + 2)
    HW = tl.load(row + 4)
    n_tiles = tl.load(row + 7)
    b = pid - tl.load(row + 11)
    out = samp_ptr + tl.load(row + 10) + b * 8
    part = part_ptr + tl.load(row + 9) + b * n_tiles
    nplane = B * n_tiles
    offs = tl.arange(0, BLOCK)
    toffs = tl.arange(0, BLOCK_T)

    mse_b = 0.0
    mu = 0.0
    rstd = 0.0
    if WHITEN == 0:
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, n_tiles, BLOCK_T):
            acc += tl.load(part + t0 + toffs, mask=t0 + toffs < n_tiles, other=0.0)
        mse_b = tl.sum(acc, axis=0)
    else:
        n = 0.0
        m2 = 0.0
        ms = 0.0
        co = 0.0
        sss = 0.0
        for t0 in range(0, n_tiles, BLOCK_T):
            tmask = t0 + toffs < n_tiles
            nt = tl.load(part + t0 + toffs, mask=tmask, other=0.0)
            mg_t = tl.load(part + nplane + t0 + toffs, mask=tmask, other=0.0)
            m2_t = tl.load(part + 2 * nplane + t0 + toffs, mask=tmask, other=0.0)
            ms_t = tl.load(part + 3 * nplane + t0 + toffs, mask=tmask, other=0.0)
            co_t = tl.load(part + 4 * nplane + t0 + toffs, mask=tmask, other=0.0)
            sss += tl.sum(tl.load(part + 5 * nplane + t0 + toffs, mask=tmask, other=0.0), axis=0)
            n_c = tl.sum(nt, axis=0)
            mg_c = tl.sum(nt * mg_t, axis=0) / n_c
            ms_c = tl.sum(nt * ms_t, axis=0) / n_c
            m2_c = tl.sum(m2_t + nt * (mg_t - mg_c) * (mg_t - mg_c), axis=0)
            co_c = tl.sum(co_t + nt * (ms_t - ms_c) * (mg_t - mg_c), axis=0)
            n_new = n + n_c
            dg = mg_c - mu
            dsm = ms_c - ms
            w = n * n_c / n_new
            m2 += m2_c + dg * dg * w
            co += co_c + dsm * dg * w
            mu += dg * n_c / n_new
            ms += dsm * n_c / n_new
            n = n_new
        rstd = 1.0 / tl.sqrt(m2 / n + EPS)
        mse_b = tl.maximum(sss - 2.0 * rstd * co + rstd * rstd * m2, 0.0)  # cancels in fp32: never < 0

    plane = B * HW
    pix = pix_ptr + tl.load(row + 8) + b * HW
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK):
        pm = p0 + offs < HW
        qs = tl.load(pix + p0 + offs, mask=pm, other=0.0)
        qg = tl.load(pix + plane + p0 + offs, mask=pm, other=0.0)
        acc_s += qs * qs
        acc_g += qg * qg
    ns = tl.sqrt(tl.sum(acc_s, axis=0))
    ng = tl.sqrt(tl.sum(acc_g, axis=0))
    # qhat and d by division, exactly as the backward kernel recomputes them: with reciprocals the two differed by
    # rounding, and where the true difference is zero (1x1 maps, spatially uniform maps) that rounding, divided by
    # the tiny ||d||, became an O(1) gradient
    den_s = tl.maximum(ns, NORM_EPS)
    den_g = tl.maximum(ng, NORM_EPS)
    acc_dd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sd = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK):
        pm = p0 + offs < HW
        qhs = tl.load(pix + p0 + offs, mask=pm, other=0.0) / den_s
        d = qhs - tl.load(pix + plane + p0 + offs, mask=pm, other=0.0) / den_g
        acc_dd += d * d
        acc_sd += qhs * d
    dd = tl.sum(acc_dd, axis=0)
    dnorm = tl.sqrt(dd)
    tl.store(out + 0, mse_b)
    if AT_MODE == 0:
        tl.store(out + 1, dnorm)
    else:
        tl.store(out + 1, dd)
    tl.store(out + 2, ns)
    tl.store(out + 3, ng)
    tl.store(out + 4, dnorm)
    tl.store(out + 5, tl.sum(acc_sd, axis=0))
    tl.store(out + 6, mu)
    tl.store(out + 7, rstd)


@triton.jit
def _fwd_level_kernel(meta_ptr, samp_ptr, mse_ptr, at_ptr, loss_ptr, num_levels, at_weight, AT_MODE: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    total = 0.0
    for lvl in range(0, num_levels):
        row = meta_ptr + lvl * 16
        B = tl.load(row + 2)
        C = tl.load(row + 3)
        HW = tl.load(row + 4)
        samp = samp_ptr + tl.load(row + 10)
        acc_m = tl.zeros([BLOCK], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK], dtype=tl.float32)
        for b0 in range(0, B, BLOCK):
            bm = b0 + offs < B
            acc_m += tl.load(samp + (b0 + offs) * 8, mask=bm, other=0.0)
            acc_a += tl.load(samp + (b0 + offs) * 8 + 1, mask=bm, other=0.0)
        Bf = B.to(tl.float32)
        mse = tl.sum(acc_m, axis=0) / (Bf * C.to(tl.float32) * HW.to(tl.float32))
        if AT_MODE == 0:
            at = tl.sum(acc_a, axis=0) / Bf
        else:
            at = tl.sum(acc_a, axis=0) / (Bf * HW.to(tl.float32))
        tl.store(mse_ptr + lvl, mse)
        tl.store(at_ptr + lvl, at)
        total += mse + at_weight * at
    tl.store(loss_ptr, total / (num_levels * 1.0))
