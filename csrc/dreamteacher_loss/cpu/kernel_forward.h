// Per-pixel-column and per-sample pieces of the CPU forward (see kernel_impl.h). Included by kernel_impl.h
// INSIDE its per-instruction-set anonymous namespace, after kernel_scalar.h: no includes, no include guard.

// ---------------------------------------------------------------- forward pieces
// Pointers below are already offset to sample b. Stats rows: mean = stats, rstd = stats + N, coef = stats + 2N
// (the coefficient row holds q_s until the per-sample phase turns it into the AT coefficient).

// whiten=channel, NCHW: pixels [p0, p0 + len) (len <= kRowPixels) in ONE sweep over the C rows, four rows at a
// time, with per-pixel accumulators in L1/L2: for a whole-row range the sweep reads the sample as one contiguous
// stream per tensor. (Narrow column tiles swept twice were 3x slower: 1000+ short strided runs defeat the
// prefetchers.) The error sum_c (s - (g - mean) * rstd)^2 follows from the sums by exact algebra, with
// d = g - g[c=0] (shifted sums keep the variance accurate) and delta = mean - g[c=0]:
//   sum_c s (g - mean) = S_sd - delta S_s,  sum_c (g - mean)^2 = S_dd - 2 delta S_d + C delta^2.
// Only the reported mse value depends on this combination (the gradient uses mean and rstd only).
template <typename T, typename A>
double channel_rows_nchw(const T* s, const T* g, int64_t C, int64_t N, int64_t p0, int64_t len, A* stats,
                         A* energy) {
  Buffer<A> buffer(7 * len);
  A* __restrict__ shift = buffer.data;
  A* __restrict__ sum_s = shift + len;
  A* __restrict__ sum_ss = sum_s + len;
  A* __restrict__ sum_d = sum_ss + len;
  A* __restrict__ sum_dd = sum_d + len;
  A* __restrict__ sum_sd = sum_dd + len;
  A* __restrict__ sum_gg = sum_sd + len;
  for (int64_t t = 0; t < len; ++t) shift[t] = Io<T>::load(g[p0 + t]);
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const T* __restrict__ s0 = s + c * N + p0;
    const T* __restrict__ s1 = s0 + N;
    const T* __restrict__ s2 = s1 + N;
    const T* __restrict__ s3 = s2 + N;
    const T* __restrict__ g0 = g + c * N + p0;
    const T* __restrict__ g1 = g0 + N;
    const T* __restrict__ g2 = g1 + N;
    const T* __restrict__ g3 = g2 + N;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const A x0 = Io<T>::load(s0[t]), x1 = Io<T>::load(s1[t]), x2 = Io<T>::load(s2[t]), x3 = Io<T>::load(s3[t]);
      const A y0 = Io<T>::load(g0[t]), y1 = Io<T>::load(g1[t]), y2 = Io<T>::load(g2[t]), y3 = Io<T>::load(g3[t]);
      const A d0 = y0 - shift[t], d1 = y1 - shift[t], d2 = y2 - shift[t], d3 = y3 - shift[t];
      sum_s[t] += (x0 + x1) + (x2 + x3);
      sum_ss[t] += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3);
      sum_d[t] += (d0 + d1) + (d2 + d3);
      sum_dd[t] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
      sum_sd[t] += (x0 * d0 + x1 * d1) + (x2 * d2 + x3 * d3);
      sum_gg[t] += (y0 * y0 + y1 * y1) + (y2 * y2 + y3 * y3);
    }
  }
  for (; c < C; ++c) {
    const T* __restrict__ sr = s + c * N + p0;
    const T* __restrict__ gr = g + c * N + p0;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const A sv = Io<T>::load(sr[t]);
      const A gv = Io<T>::load(gr[t]);
      const A d = gv - shift[t];
      sum_s[t] += sv;
      sum_ss[t] += sv * sv;
      sum_d[t] += d;
      sum_dd[t] += d * d;
      sum_sd[t] += sv * d;
      sum_gg[t] += gv * gv;
    }
  }
  const double count = static_cast<double>(C);
  double total = 0.0;
  for (int64_t t = 0; t < len; ++t) {
    const double md = static_cast<double>(sum_d[t]) / count;
    double var = static_cast<double>(sum_dd[t]) / count - md * md;
    var = var > 0.0 ? var : 0.0;
    const A rstd = rsqrt_eps(static_cast<A>(var));
    const double r = static_cast<double>(rstd);
    const double sum_sw = static_cast<double>(sum_sd[t]) - md * static_cast<double>(sum_s[t]);
    const double sum_ww = static_cast<double>(sum_dd[t]) - 2.0 * md * static_cast<double>(sum_d[t]) + count * md * md;
    const double err = static_cast<double>(sum_ss[t]) - 2.0 * r * sum_sw + r * r * sum_ww;
    total += err < 0.0 ? 0.0 : err;  // clamps rounding below 0; a NaN (from a NaN input) stays NaN
    stats[p0 + t] = static_cast<A>(static_cast<double>(shift[t]) + md);
    stats[N + p0 + t] = rstd;
    stats[2 * N + p0 + t] = sum_ss[t];
    energy[p0 + t] = sum_gg[t];
  }
  return total;
}

// whiten=channel, NHWC: pixel p's column is contiguous.
template <typename T, typename A>
double channel_pixel_nhwc(const T* __restrict__ sc, const T* __restrict__ gc, int64_t C, int64_t N, int64_t p,
                          A* stats, A* energy) {
  const A shift = Io<T>::load(gc[0]);
  A sum_d = 0, sum_dd = 0, sum_ss = 0, sum_gg = 0;
#pragma omp simd reduction(+ : sum_d, sum_dd, sum_ss, sum_gg)
  for (int64_t c = 0; c < C; ++c) {
    const A sv = Io<T>::load(sc[c]);
    const A gv = Io<T>::load(gc[c]);
    const A d = gv - shift;
    sum_d += d;
    sum_dd += d * d;
    sum_ss += sv * sv;
    sum_gg += gv * gv;
  }
  const A inv_c = A(1) / static_cast<A>(C);
  const A md = sum_d * inv_c;
  A var = sum_dd * inv_c - md * md;
  var = var > A(0) ? var : A(0);
  const A mean = shift + md, rstd = rsqrt_eps(var);
  A err = 0;
#pragma omp simd reduction(+ : err)
  for (int64_t c = 0; c < C; ++c) {
    const A e = Io<T>::load(sc[c]) - (Io<T>::load(gc[c]) - mean) * rstd;
    err += e * e;
  }
  stats[p] = mean;
  stats[N + p] = rstd;
  stats[2 * N + p] = sum_ss;
  energy[p] = sum_gg;
  return static_cast<double>(err);
}

// whiten=sample, first read of g: q_g per pixel and the task's sums of (g - shift) and (g - shift)^2.
template <typename T, typename A>
void sample_stats_range(const T* g, int64_t C, int64_t N, bool channels_last, int64_t p0, int64_t p1, A* energy,
                        double* sums) {
  const A shift = Io<T>::load(g[0]);
  double sum_d = 0.0, sum_dd = 0.0;
  if (channels_last) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* __restrict__ gc = g + p * C;
      A d1 = 0, d2 = 0, gg = 0;
#pragma omp simd reduction(+ : d1, d2, gg)
      for (int64_t c = 0; c < C; ++c) {
        const A gv = Io<T>::load(gc[c]);
        const A d = gv - shift;
        d1 += d;
        d2 += d * d;
        gg += gv * gv;
      }
      energy[p] = gg;
      sum_d += static_cast<double>(d1);
      sum_dd += static_cast<double>(d2);
    }
  } else {
    for (int64_t p0t = p0; p0t < p1; p0t += kTile) {
      const int64_t len = p1 - p0t < kTile ? p1 - p0t : kTile;
      A d1[kTile], d2[kTile], gg[kTile];
      for (int64_t t = 0; t < len; ++t) d1[t] = d2[t] = gg[t] = A(0);
      for (int64_t c = 0; c < C; ++c) {
        const T* __restrict__ gr = g + c * N + p0t;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) {
          const A gv = Io<T>::load(gr[t]);
          const A d = gv - shift;
          d1[t] += d;
          d2[t] += d * d;
          gg[t] += gv * gv;
        }
      }
      for (int64_t t = 0; t < len; ++t) {
        energy[p0t + t] = gg[t];
        sum_d += static_cast<double>(d1[t]);
        sum_dd += static_cast<double>(d2[t]);
      }
    }
  }
  sums[0] = sum_d;
  sums[1] = sum_dd;
}

// whiten=sample, second read: q_s per pixel and sum of (s - (g - mean) * rstd)^2 over the range.
template <typename T, typename A>
double sample_error_range(const T* s, const T* g, int64_t C, int64_t N, bool channels_last, int64_t p0, int64_t p1,
                          A mean, A rstd, A* stats) {
  double total = 0.0;
  if (channels_last) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* __restrict__ sc = s + p * C;
      const T* __restrict__ gc = g + p * C;
      A ss = 0, err = 0;
#pragma omp simd reduction(+ : ss, err)
      for (int64_t c = 0; c < C; ++c) {
        const A sv = Io<T>::load(sc[c]);
        const A e = sv - (Io<T>::load(gc[c]) - mean) * rstd;
        ss += sv * sv;
        err += e * e;
      }
      stats[p] = mean;
      stats[N + p] = rstd;
      stats[2 * N + p] = ss;
      total += static_cast<double>(err);
    }
  } else {
    for (int64_t p0t = p0; p0t < p1; p0t += kTile) {
      const int64_t len = p1 - p0t < kTile ? p1 - p0t : kTile;
      A ss[kTile], err[kTile];
      for (int64_t t = 0; t < len; ++t) ss[t] = err[t] = A(0);
      for (int64_t c = 0; c < C; ++c) {
        const T* __restrict__ sr = s + c * N + p0t;
        const T* __restrict__ gr = g + c * N + p0t;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) {
          const A sv = Io<T>::load(sr[t]);
          const A e = sv - (Io<T>::load(gr[t]) - mean) * rstd;
          ss[t] += sv * sv;
          err[t] += e * e;
        }
      }
      for (int64_t t = 0; t < len; ++t) {
        stats[p0t + t] = mean;
        stats[N + p0t + t] = rstd;
        stats[2 * N + p0t + t] = ss[t];
        total += static_cast<double>(err[t]);
      }
    }
  }
  return total;
}

// Per-sample attention-transfer term from q_s (in the coef row) and q_g; replaces q_s by the coefficient.
// qhat = q / max(||q||, eps); paper: AT_b = ||qhat_s - qhat_g||, code: AT_b = mean_p (qhat_s - qhat_g)^2.
// u = dAT_l/dqhat_s (AT_l = mean_b AT_b); dAT_l/dq_s = (u - qhat_s <qhat_s, u>) / ||q_s|| (u / eps if clamped).
template <typename A>
double attention_sample(A* coef, const A* energy, int64_t N, int64_t B, int at_mode) {
  double ns2 = 0.0, ng2 = 0.0;
  for (int64_t p = 0; p < N; ++p) {
    ns2 += static_cast<double>(coef[p]) * static_cast<double>(coef[p]);
    ng2 += static_cast<double>(energy[p]) * static_cast<double>(energy[p]);
  }
  const double ns = __builtin_sqrt(ns2), ng = __builtin_sqrt(ng2);
  const bool s_clamped = ns < kAttentionEps;
  const double inv_ns = 1.0 / (s_clamped ? kAttentionEps : ns);
  const double inv_ng = 1.0 / (ng < kAttentionEps ? kAttentionEps : ng);
  double dd = 0.0;
  for (int64_t p = 0; p < N; ++p) {
    const double d = static_cast<double>(coef[p]) * inv_ns - static_cast<double>(energy[p]) * inv_ng;
    dd += d * d;
  }
  double value, u_scale;  // u_p = u_scale * d_p
  if (at_mode == 0) {
    value = __builtin_sqrt(dd);
    u_scale = value > 0.0 ? 1.0 / (static_cast<double>(B) * value) : 0.0;
  } else {
    value = dd / static_cast<double>(N);
    u_scale = 2.0 / (static_cast<double>(B) * static_cast<double>(N));
  }
  double dot = 0.0;  // <qhat_s, u>
  if (!s_clamped) {
    for (int64_t p = 0; p < N; ++p) {
      const double qh = static_cast<double>(coef[p]) * inv_ns;
      dot += qh * u_scale * (qh - static_cast<double>(energy[p]) * inv_ng);
    }
  }
  for (int64_t p = 0; p < N; ++p) {
    const double qh = static_cast<double>(coef[p]) * inv_ns;
    const double u = u_scale * (qh - static_cast<double>(energy[p]) * inv_ng);
    const double dq = s_clamped ? u * inv_ns : (u - qh * dot) * inv_ns;
    coef[p] = static_cast<A>(2.0 * dq);
  }
  return value;
}
