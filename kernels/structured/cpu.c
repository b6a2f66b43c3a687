/* The structured path's series on the CPU, one image at a time with its vectors in cache:
   the Chebyshev series' forward basis and its reverse pass, and the matrix-free series of the
   blocks with few steps (forward and backward).

   Built at first use by scm_ops/structured/cpu.py (cc -O3 [-march=native] [-fopenmp]
   -shared) and called through ctypes, one call per series; the PyTorch loops
   (scm_ops/structured/chebyshev.py: _basis, _adjoint_sweep; series.py: _series_fwd_torch,
   _series_bwd_torch) compute the same and run where no C compiler builds this file.

   The stencil of one image, N cells, K offsets with flat shifts m_k > 0:
       (L x)[n] = d[n] x[n] + sum_k ( w_k[n] x[n + m_k] + w_k[n - m_k] x[n - m_k] ),
   w_k zero wherever n + o_k leaves the grid (and so across a row end). Each image's planes and
   vectors are copied into zero-padded local rows of N + 2 R values (R = max m_k), so a shifted
   read never leaves them and needs no mask, and reads past the image are zeros. Every inner
   loop runs over the cells with unit-stride loads, which the compiler vectorises. Images are
   shared among OpenMP threads (torch.get_num_threads()).

   Chebyshev: Lh = s L (s = 2 / R_series), Y = I - Lh^2 / 2, the basis v_k = T_k(Y) F:
       v_0 = F, v_1 = F - Lh (Lh F) / 2, v_{k+1} = 2 v_k - v_{k-1} - Lh (Lh v_k),
   and phi(Z) F = sum_{k < ncoef} c_k v_k.
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_K 4

typedef struct {
    int64_t n, pad, k;
    int64_t shift[MAX_K];
    double *d, *fw[MAX_K], *bw[MAX_K];   /* padded rows: d, w_k[n], w_k[n - m_k] */
} image_stencil;

/* y[n] = s (L x)[n] over the image's cells (x, y padded rows). */
static void apply(const image_stencil *st, double s, const double *restrict x, double *restrict y) {
    const int64_t lo = st->pad, hi = st->pad + st->n;
    const double *restrict d = st->d;
    if (st->k == 2) {
        const double *restrict a = st->fw[0], *restrict b = st->bw[0], *restrict c = st->fw[1], *restrict e = st->bw[1];
        const int64_t m0 = st->shift[0], m1 = st->shift[1];
        for (int64_t i = lo; i < hi; ++i)
            y[i] = s * (d[i] * x[i] + a[i] * x[i + m0] + b[i] * x[i - m0] + c[i] * x[i + m1] + e[i] * x[i - m1]);
    } else {
        for (int64_t i = lo; i < hi; ++i)
            y[i] = d[i] * x[i];
        for (int64_t k = 0; k < st->k; ++k) {
            const double *restrict a = st->fw[k], *restrict b = st->bw[k];
            const int64_t m = st->shift[k];
            for (int64_t i = lo; i < hi; ++i)
                y[i] += a[i] * x[i + m] + b[i] * x[i - m];
        }
        for (int64_t i = lo; i < hi; ++i)
            y[i] *= s;
    }
}

/* One allocation per image: 1 + 2K plane rows and `vectors` vector rows, zeroed. */
static double *image_rows(image_stencil *st, int64_t b, int64_t n_img, int64_t total, int64_t k, const int64_t *shift,
                          const double *d, const double *w, int64_t vectors) {
    int64_t pad = 0;
    for (int64_t j = 0; j < k; ++j)
        if (shift[j] > pad) pad = shift[j];
    const int64_t len = n_img + 2 * pad;
    double *mem = calloc((size_t)((1 + 2 * k + vectors) * len), sizeof(double));
    if (!mem) return NULL;
    st->n = n_img;
    st->pad = pad;
    st->k = k;
    st->d = mem;
    memcpy(st->d + pad, d + b * n_img, (size_t)n_img * sizeof(double));
    for (int64_t j = 0; j < k; ++j) {
        const double *wk = w + j * total + b * n_img;
        st->shift[j] = shift[j];
        st->fw[j] = mem + (1 + 2 * j) * len;
        st->bw[j] = mem + (2 + 2 * j) * len;
        memcpy(st->fw[j] + pad, wk, (size_t)n_img * sizeof(double));
        for (int64_t i = shift[j]; i < n_img; ++i)
            st->bw[j][pad + i] = wk[i - shift[j]];
    }
    return mem;
}

/* f, phi_f [B N]; d [B N]; w [K, B N]; basis [degree + 1, B N] or NULL; coef [ncoef].
   Returns 0, or the number of images whose memory could not be allocated. */
int chebyshev_basis(int64_t batch, int64_t n_img, int64_t k, const int64_t *shift, const double *f, const double *d,
                    const double *w, double s, const double *coef, int64_t ncoef, int64_t degree, double *basis,
                    double *phi_f, int threads) {
    const int64_t total = batch * n_img;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : failed)
    for (int64_t b = 0; b < batch; ++b) {
        image_stencil st;
        double *mem = image_rows(&st, b, n_img, total, k, shift, d, w, 5);
        if (!mem) {
            failed += 1;
            continue;
        }
        const int64_t len = n_img + 2 * st.pad, lo = st.pad, hi = st.pad + n_img;
        double *prev = mem + (1 + 2 * k) * len, *cur = prev + len, *y = cur + len, *z = y + len, *phi = z + len;
        memcpy(cur + lo, f + b * n_img, (size_t)n_img * sizeof(double));
        for (int64_t i = lo; i < hi; ++i) phi[i] = coef[0] * cur[i];
        if (basis) memcpy(basis + b * n_img, cur + lo, (size_t)n_img * sizeof(double));
        for (int64_t step = 1; step <= degree; ++step) {
            apply(&st, s, cur, y);
            apply(&st, s, y, z);                                  /* z = Lh^2 v_{step-1} */
            if (step == 1) {
                for (int64_t i = lo; i < hi; ++i) prev[i] = cur[i] - 0.5 * z[i];
            } else {
                for (int64_t i = lo; i < hi; ++i) prev[i] = 2.0 * cur[i] - prev[i] - z[i];
            }
            double *t = prev; prev = cur; cur = t;                /* cur = v_step, prev = v_{step-1} */
            if (step < ncoef) {
                const double c = coef[step];
                for (int64_t i = lo; i < hi; ++i) phi[i] += c * cur[i];
            }
            if (basis) memcpy(basis + step * total + b * n_img, cur + lo, (size_t)n_img * sizeof(double));
        }
        memcpy(phi_f + b * n_img, phi + lo, (size_t)n_img * sizeof(double));
        free(mem);
    }
    return failed;
}

/* acc_k[n] += wt (p[n] q[n + m_k] + p[n + m_k] q[n]), diag[n] += wt p[n] q[n]: the stencil
   entries of wt p q^T (symmetrised), on the image's cells. */
static void read_pairs(const image_stencil *st, double wt, const double *restrict p, const double *restrict q,
                       double *const *acc, double *restrict diag) {
    const int64_t lo = st->pad, hi = st->pad + st->n;
    for (int64_t i = lo; i < hi; ++i) diag[i] += wt * p[i] * q[i];
    for (int64_t k = 0; k < st->k; ++k) {
        double *restrict a = acc[k];
        const int64_t m = st->shift[k];
        for (int64_t i = lo; i < hi; ++i) a[i] += wt * (p[i] * q[i + m] + p[i + m] * q[i]);
    }
}

/* The reverse (Clenshaw) pass of the series (chebyshev._adjoint_sweep) and the g (phi(Z) F)^T
   term, per image. g, lg = L g, phi_f [B N]; coef [degree + 1, streams] (phi, and psi for the
   published gradient); basis [degree + 1, B N]. Writes grad_f [B N] and the gradient of L at
   the stencil entries: pairs [K, B N] (G[n, n + m_k] + G[n + m_k, n], not yet masked to the
   grid) and diag [B N]. Streams b = (b_phi) or (e, b_phi), e = Lh b_phi + (2/R) b_psi:
       b_k = c_k h + 2 b_{k+1} - b_{k+2} - Lh^2 b_{k+1},  h = (L g) or (Lh L g, L g),
       e_k also + (2/R) c_psi_k g;
   b_{k+1} read against v_k with weight -2/R (-1/R at k = 0): with psi (y_k, b_phi) and
   (e, v_k), without (Lh b_phi, v_k) and (b_phi, y_k), y_k = Lh v_k. Returns 0, or the number
   of images whose memory could not be allocated. */
int chebyshev_adjoint(int64_t batch, int64_t n_img, int64_t k, const int64_t *shift, const double *d, const double *w,
                      double s, double radius, const double *coef, int64_t streams, int64_t degree, const double *basis,
                      const double *g, const double *lg, const double *phi_f, double *grad_f, double *pairs,
                      double *diag, int threads) {
    const int64_t total = batch * n_img;
    const int64_t S = streams;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : failed)
    for (int64_t b = 0; b < batch; ++b) {
        image_stencil st;
        /* rows: g, lg, h[2], next[2] (b_{k+1}), after[2] (b_{k+2}, then b_k), lb[2], v, y, z, phi, acc[K], diag */
        double *mem = image_rows(&st, b, n_img, total, k, shift, d, w, 16 + k);
        if (!mem) {
            failed += 1;
            continue;
        }
        const int64_t len = n_img + 2 * st.pad, lo = st.pad, hi = st.pad + n_img;
        double *row = mem + (1 + 2 * k) * len;
        double *gr = row, *lgr = row + len, *h[2] = {row + 2 * len, row + 3 * len};
        double *next[2] = {row + 4 * len, row + 5 * len}, *after[2] = {row + 6 * len, row + 7 * len};
        double *lb[2] = {row + 8 * len, row + 9 * len}, *v = row + 10 * len, *y = row + 11 * len;
        double *z = row + 12 * len, *phi = row + 13 * len, *dg = row + 14 * len, *acc[MAX_K];
        for (int64_t j = 0; j < k; ++j) acc[j] = row + (15 + j) * len;
        memcpy(gr + lo, g + b * n_img, (size_t)n_img * sizeof(double));
        memcpy(lgr + lo, lg + b * n_img, (size_t)n_img * sizeof(double));
        memcpy(phi + lo, phi_f + b * n_img, (size_t)n_img * sizeof(double));
        const int64_t phi_stream = S - 1;                        /* b = (b_phi) or (e, b_phi) */
        if (S == 2) {
            apply(&st, s, lgr, h[0]);                            /* cotangent of e: Lh L g (times c_phi) */
            memcpy(h[1] + lo, lgr + lo, (size_t)n_img * sizeof(double));
        } else {
            memcpy(h[0] + lo, lgr + lo, (size_t)n_img * sizeof(double));
        }
        const double two_over_r = 2.0 / radius;
        /* b_n = c_n h (+ (2/R) c_psi g for e); b_{n+1} = 0 (after[] is zeroed) */
        for (int64_t t = 0; t < S; ++t)
            for (int64_t i = lo; i < hi; ++i) next[t][i] = coef[degree * S] * h[t][i];
        if (S == 2)
            for (int64_t i = lo; i < hi; ++i) next[0][i] += two_over_r * coef[degree * S + 1] * gr[i];
        for (int64_t step = degree - 1; step >= 0; --step) {
            memcpy(v + lo, basis + step * total + b * n_img, (size_t)n_img * sizeof(double));
            for (int64_t t = 0; t < S; ++t) apply(&st, s, next[t], lb[t]);   /* Lh b_{k+1} */
            apply(&st, s, v, y);                                             /* y_k = Lh v_k */
            const double wt = (step ? -2.0 : -1.0) / radius;
            if (S == 2) {
                read_pairs(&st, wt, y, next[1], acc, dg);
                read_pairs(&st, wt, next[0], v, acc, dg);
            } else {
                read_pairs(&st, wt, lb[0], v, acc, dg);
                read_pairs(&st, wt, next[0], y, acc, dg);
            }
            if (step == 0) break;
            const double c = coef[step * S];
            for (int64_t t = 0; t < S; ++t) {
                apply(&st, s, lb[t], z);                                     /* Lh^2 b_{k+1} */
                double *restrict bk = after[t];
                const double *restrict bn = next[t], *restrict ht = h[t];
                for (int64_t i = lo; i < hi; ++i) bk[i] = 2.0 * bn[i] - bk[i] + c * ht[i] - z[i];
            }
            if (S == 2) {
                const double cp = two_over_r * coef[step * S + 1];
                for (int64_t i = lo; i < hi; ++i) after[0][i] += cp * gr[i];
            }
            for (int64_t t = 0; t < S; ++t) {                                /* b_k becomes b_{k+1} */
                double *tmp = next[t]; next[t] = after[t]; after[t] = tmp;
            }
        }
        /* b_0 of phi: c_0 L g + b_1 - b_2 - Lh (Lh b_1) / 2, b_1 = next, b_2 = after, Lh b_1 = lb */
        apply(&st, s, lb[phi_stream], z);
        double *out = grad_f + b * n_img;
        for (int64_t i = lo; i < hi; ++i)
            out[i - lo] = coef[0] * lgr[i] + next[phi_stream][i] - after[phi_stream][i] - 0.5 * z[i];
        read_pairs(&st, 1.0, gr, phi, acc, dg);                              /* + g (phi(Z) F)^T */
        for (int64_t j = 0; j < k; ++j) memcpy(pairs + j * total + b * n_img, acc[j] + lo, (size_t)n_img * sizeof(double));
        memcpy(diag + b * n_img, dg + lo, (size_t)n_img * sizeof(double));
        free(mem);
    }
    return failed;
}

/* The matrix-free series of a block with few steps (scm_ops/structured/series.py):
   x_0 = 0, alpha r_j = alpha (F - L x_j), x_{j+1} = x_j + L (alpha r_j), u = x_steps.
   Keeps q [steps, rows, B N]: row 0 -x_j, row 1 (rows = 2) alpha r_j. */
int stencil_series_forward(int64_t batch, int64_t n_img, int64_t k, const int64_t *shift, const double *f,
                           const double *d, const double *w, double alpha, int64_t steps, int64_t rows, double *u,
                           double *q, int threads) {
    const int64_t total = batch * n_img;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : failed)
    for (int64_t b = 0; b < batch; ++b) {
        image_stencil st;
        double *mem = image_rows(&st, b, n_img, total, k, shift, d, w, 3);
        if (!mem) {
            failed += 1;
            continue;
        }
        const int64_t len = n_img + 2 * st.pad, lo = st.pad, hi = st.pad + n_img;
        double *x = mem + (1 + 2 * k) * len, *r = x + len, *lx = r + len;
        const double *fb = f + b * n_img;
        for (int64_t j = 0; j < steps; ++j) {
            apply(&st, 1.0, x, lx);
            for (int64_t i = lo; i < hi; ++i) r[i] = alpha * (fb[i - lo] - lx[i]);
            double *qj = q + j * rows * total + b * n_img;
            for (int64_t i = lo; i < hi; ++i) qj[i - lo] = -x[i];
            if (rows == 2) memcpy(qj + total, r + lo, (size_t)n_img * sizeof(double));
            apply(&st, 1.0, r, lx);
            for (int64_t i = lo; i < hi; ++i) x[i] += lx[i];
        }
        memcpy(u + b * n_img, x + lo, (size_t)n_img * sizeof(double));
        free(mem);
    }
    return failed;
}

/* Its backward: from a = du, for j = steps-1 .. 0: b_j = alpha L a_{j+1}, a_j = a_{j+1} - L b_j;
   dF = sum_j b_j, and the stencil entries of sum_j b_j (-x_j)^T [+ a_{j+1} (alpha r_j)^T]
   (rows = 2: the exact gradient) into pairs [K, B N] (not masked to the grid) and diag [B N]. */
int stencil_series_backward(int64_t batch, int64_t n_img, int64_t k, const int64_t *shift, const double *d,
                            const double *w, double alpha, int64_t steps, int64_t rows, int64_t q_rows,
                            const double *q, const double *grad_u, double *grad_f, double *pairs, double *diag,
                            int threads) {
    const int64_t total = batch * n_img;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : failed)
    for (int64_t b = 0; b < batch; ++b) {
        image_stencil st;
        double *mem = image_rows(&st, b, n_img, total, k, shift, d, w, 7 + k);
        if (!mem) {
            failed += 1;
            continue;
        }
        const int64_t len = n_img + 2 * st.pad, lo = st.pad, hi = st.pad + n_img;
        double *a = mem + (1 + 2 * k) * len, *bj = a + len, *lb = bj + len, *nx = lb + len, *ar = nx + len;
        double *gf = ar + len, *dg = gf + len, *acc[MAX_K];
        for (int64_t j = 0; j < k; ++j) acc[j] = dg + (1 + j) * len;
        memcpy(a + lo, grad_u + b * n_img, (size_t)n_img * sizeof(double));
        for (int64_t j = steps - 1; j >= 0; --j) {
            apply(&st, alpha, a, bj);                                   /* b_j = alpha L a_{j+1} */
            const double *qj = q + j * q_rows * total + b * n_img;
            memcpy(nx + lo, qj, (size_t)n_img * sizeof(double));        /* -x_j */
            read_pairs(&st, 1.0, bj, nx, acc, dg);
            if (rows == 2) {
                memcpy(ar + lo, qj + total, (size_t)n_img * sizeof(double));   /* alpha r_j */
                read_pairs(&st, 1.0, a, ar, acc, dg);
            }
            for (int64_t i = lo; i < hi; ++i) gf[i] += bj[i];
            apply(&st, 1.0, bj, lb);
            for (int64_t i = lo; i < hi; ++i) a[i] -= lb[i];
        }
        memcpy(grad_f + b * n_img, gf + lo, (size_t)n_img * sizeof(double));
        for (int64_t j = 0; j < k; ++j) memcpy(pairs + j * total + b * n_img, acc[j] + lo, (size_t)n_img * sizeof(double));
        memcpy(diag + b * n_img, dg + lo, (size_t)n_img * sizeof(double));
        free(mem);
    }
    return failed;
}
