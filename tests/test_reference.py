"""An outside check of scm_ops.reference.activation_diffusion_ref, the oracle of every module
parity test: a hand-computed case on a 1 x 3 grid, a second float64 implementation of the
published stack written separately in NumPy (scalar loops for the graph and the cosines,
no code shared with the package), and finite differences of it against the reference's
gradients, for the exact gradient and for the published one (initial iterate held fixed).

The published stack, one block: E the cosine of the patches' C-vectors of S (no epsilon);
G = D - A of the grid graph; L = G * (lam E - 1) entrywise; X_0 = alpha L^T,
X_{k+1} = X_k (2I - L X_k), p times; u = X_p^T F; t = tanhshrink(u / (beta max F));
tau = (t - min t) / max(t - min t); then F <- F + tau and S <- S * (1 + tau).
"""
import math

import numpy as np
import pytest
import torch

from scm_ops.reference import activation_diffusion_ref


def grid_graph_laplacian(height, width, connectivity):
    """D - A of the grid, built cell by cell: 4 neighbours share an edge, 8 also a corner."""
    n = height * width
    lap = np.zeros((n, n))
    for r in range(height):
        for c in range(width):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if (dr, dc) == (0, 0) or (connectivity == 4 and dr != 0 and dc != 0):
                        continue
                    r2, c2 = r + dr, c + dc
                    if 0 <= r2 < height and 0 <= c2 < width:
                        lap[r * width + c, r2 * width + c2] = -1.0
                        lap[r * width + c, r * width + c] += 1.0
    return lap


def cosine_matrix(vectors):
    """vectors [N, C] -> [N, N] cosines, entry by entry, no epsilon."""
    n = vectors.shape[0]
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = np.dot(vectors[i], vectors[j]) / (math.sqrt(np.dot(vectors[i], vectors[i]))
                                                          * math.sqrt(np.dot(vectors[j], vectors[j])))
    return out


def numpy_stack(attention, semantic, lams, betas, iterations, alpha=0.002, connectivity=4,
                frozen_initial=None, record_initial=None):
    """The published stack in float64 NumPy, image by image. attention [B, H, W], semantic
    [B, C, H, W]. frozen_initial[b][k], if given, replaces X_0 of block k for image b (the
    published gradient treats X_0 as a constant); record_initial collects the X_0 used."""
    f_all = np.array(attention, dtype=np.float64)
    s_all = np.array(semantic, dtype=np.float64)
    batch, channels, height, width = s_all.shape
    n = height * width
    lap = grid_graph_laplacian(height, width, connectivity)
    f_out, s_out = [], []
    for b in range(batch):
        f = f_all[b].reshape(n).copy()
        s = s_all[b].reshape(channels, n).copy()
        initials = []
        for k, (lam, beta, p) in enumerate(zip(lams, betas, iterations)):
            e = cosine_matrix(s.T)
            lap_sem = lap * (lam * e - 1.0)
            x = alpha * lap_sem.T if frozen_initial is None else frozen_initial[b][k]
            initials.append(x.copy())
            for _ in range(p):
                x = x @ (2.0 * np.eye(n) - lap_sem @ x)
            u = x.T @ f
            z = u / (beta * f.max())
            t = z - np.tanh(z)
            t = t - t.min()
            tau = t / t.max()
            f = f + tau
            s = s * (1.0 + tau)[None, :]
        if record_initial is not None:
            record_initial.append(initials)
        f_out.append(f.reshape(height, width))
        s_out.append(s.reshape(channels, height, width))
    return np.stack(f_out), np.stack(s_out)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def random_case(batch=2, channels=3, grid=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    attention = rng.random((batch, *grid))
    semantic = rng.standard_normal((batch, channels, *grid))   # signed, like a conv output
    return attention, semantic


def reference(attention, semantic, lams, betas, iterations, alpha, connectivity=4, detach_init=True):
    out = activation_diffusion_ref(*(torch.tensor(x, dtype=torch.float64) for x in (attention, semantic, lams, betas)),
                                   iterations, alpha, connectivity, detach_init)
    return [o.detach().numpy() for o in out]


def test_hand_computed_one_by_three_grid():
    """Two blocks on a 1 x 3 grid (a path of three patches, degrees 1, 2, 1), C = 2.
    Block 1 has p = 0, so M = X_0^T = alpha L; block 2 has p = 1, M = 2 alpha L - alpha^2 L^3
    (L symmetric). alpha = 0.5 keeps tanhshrink away from its cancellation near 0."""
    v = [(1.0, 0.0), (1.0, 1.0), (1.0, 3.0)]
    cos12 = 1 / math.sqrt(2)                       # (1, 0).(1, 1) / (1 * sqrt 2)
    cos23 = 4 / (math.sqrt(2) * math.sqrt(10))     # (1, 1).(1, 3) / (sqrt 2 * sqrt 10)
    f = [0.2, 1.0, 0.6]
    alpha, lams, betas = 0.5, (1.5, 0.8), (0.5, 0.7)

    def laplacian(lam):
        a, b = 1 - lam * cos12, 1 - lam * cos23    # L[i, j] = -1 * (lam E_ij - 1) off the diagonal
        d = lam - 1                                # L[i, i] = deg_i (lam * 1 - 1)
        return np.array([[1 * d, a, 0.0], [a, 2 * d, b], [0.0, b, 1 * d]])

    def block(f, m, beta):
        u = m @ np.array(f)
        t = [x / (beta * max(f)) - math.tanh(x / (beta * max(f))) for x in u]
        tau = [(x - min(t)) / (max(t) - min(t)) for x in t]
        return [fi + ti for fi, ti in zip(f, tau)], tau

    f1, tau1 = block(f, alpha * laplacian(lams[0]), betas[0])
    lap2 = laplacian(lams[1])              # the cosines do not see the positive scaling by 1 + tau
    f2, tau2 = block(f1, 2 * alpha * lap2 - alpha ** 2 * lap2 @ lap2 @ lap2, betas[1])
    scale = [(1 + a) * (1 + b) for a, b in zip(tau1, tau2)]
    s_expected = [[v[n][ch] * scale[n] for n in range(3)] for ch in range(2)]
    semantic = np.array([[[v[n][ch] for n in range(3)]] for ch in range(2)])[None]   # [1, 2, 1, 3]
    out_f, out_s = reference(np.array([[f]]), semantic, lams, betas, (0, 1), alpha)
    # measured: 2.2e-16 and 2.0e-16 (float64 rounding of the same few operations)
    assert rel_err(out_f[0, 0], f2) < 2e-15
    assert rel_err(out_s[0, :, 0], s_expected) < 2e-15
    assert min(tau1) == 0 and max(tau1) == 1 and 0 < sorted(tau1)[1] < 1    # min-max really acts


def test_two_patches_by_hand():
    """A 1 x 2 grid: min-max leaves tau = (0, 1) or (1, 0); with lam = 1 the diagonal of L is 0
    and u = x_p (F_2, F_1) with x_p > 0, so the patch whose neighbour is larger gets tau = 1."""
    semantic = np.array([[[[1.0, 0.5]], [[0.2, 1.0]]]])     # [1, 2, 1, 2]
    out_f, out_s = reference(np.array([[[0.3, 0.9]]]), semantic, [1.0], [0.5], (3,), 0.002)
    assert out_f.tolist() == [[[1.3, 0.9]]]
    assert out_s.tolist() == [[[[2.0, 0.5]], [[0.4, 1.0]]]]


# measured relative errors, attention / semantic: alpha = 0.002: 1.4e-14 / 1.3e-14 (4
# neighbours), 7.4e-15 / 6.9e-15 (8); alpha = 0.05: 6.0e-16 / 4.4e-16, 4.5e-16 / 7.0e-16. At
# alpha = 0.002 u / (beta max F) is ~1e-2, where x - tanh(x) ~ x^3 / 3 cancels ~4 digits.
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("alpha, tol", [(0.002, 1.5e-13), (0.05, 7e-15)])
def test_forward_matches_numpy_stack(alpha, tol, connectivity):
    attention, semantic = random_case()
    lams, betas, iterations = (1.0, 1.3), (0.5, 0.35), (3, 2)
    ours = reference(attention, semantic, lams, betas, iterations, alpha, connectivity)
    theirs = numpy_stack(attention, semantic, lams, betas, iterations, alpha, connectivity)
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < tol


def test_forward_matches_numpy_stack_published_configuration():
    """Four blocks with p = 16, 4, 4, 4 at alpha = 0.002 on a 4 x 4 grid, lam and beta at
    their published initial values 1 and 0.5."""
    attention, semantic = random_case(2, 5, (4, 4), seed=3)
    args = ((1.0,) * 4, (0.5,) * 4, (16, 4, 4, 4), 0.002)
    ours = reference(attention, semantic, *args)
    theirs = numpy_stack(attention, semantic, *args)
    # measured: attention 5.2e-15, semantic 7.9e-15
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < 8e-14


def _loss_weights(shape_f, shape_s, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape_f), rng.standard_normal(shape_s)


def _reference_gradients(attention, semantic, lams, betas, iterations, alpha, detach_init, w_f, w_s):
    leaves = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (attention, semantic, lams, betas)]
    out_f, out_s = activation_diffusion_ref(*leaves, iterations, alpha, detach_init=detach_init)
    loss = (out_f * torch.tensor(w_f)).sum() + (out_s * torch.tensor(w_s)).sum()
    return [g.numpy() for g in torch.autograd.grad(loss, leaves)]


def _central_difference(func, x, i, h):
    plus, minus = list(x), list(x)
    plus[i] += h
    minus[i] -= h
    return (func(plus) - func(minus)) / (2 * h)


@pytest.mark.parametrize("published", [False, True], ids=["exact_grad", "published_grad"])
def test_gradients_to_lam_and_beta_by_finite_differences(published):
    """d loss / d lam_k and d beta_k for a random linear loss of both outputs. The published
    gradient is the derivative with every block's X_0 held at its value (it carries no
    gradient), so the NumPy stack is differentiated with those X_0 frozen."""
    attention, semantic = random_case()
    iterations, alpha = (3, 2), 0.05
    lams, betas = [1.0, 1.3], [0.5, 0.35]
    w_f, w_s = _loss_weights(attention.shape, semantic.shape)
    frozen = None
    if published:
        frozen = []
        numpy_stack(attention, semantic, lams, betas, iterations, alpha, record_initial=frozen)

    def loss(lams_, betas_):
        f, s = numpy_stack(attention, semantic, lams_, betas_, iterations, alpha, frozen_initial=frozen)
        return (f * w_f).sum() + (s * w_s).sum()

    _, _, g_lam, g_beta = _reference_gradients(attention, semantic, lams, betas, iterations, alpha,
                                               published, w_f, w_s)
    h = 1e-5
    fd_lam = [_central_difference(lambda x: loss(x, betas), lams, k, h) for k in range(2)]
    fd_beta = [_central_difference(lambda x: loss(lams, x), betas, k, h) for k in range(2)]
    # measured: lam 2.3e-9 / 3.0e-10, beta 7.6e-10 / 1.2e-9 (exact / published); central
    # differences at h = 1e-5 carry ~h^2 truncation and ~1e-16 / h rounding (h = 1e-4: 2e-7)
    assert rel_err(g_lam, fd_lam) < 3e-8
    assert rel_err(g_beta, fd_beta) < 3e-8
    # the two semantics differ by far more than that here (measured 0.60 and 1.43 for lam;
    # the gradient to beta is the same in both, 6e-15 apart)
    other = _reference_gradients(attention, semantic, lams, betas, iterations, alpha, not published, w_f, w_s)
    assert rel_err(other[2], g_lam) > 1e-3


def test_gradient_to_inputs_by_finite_differences():
    """Exact gradient to a few entries of F and S (they reach the output through E, u, max F
    and the residual updates)."""
    attention, semantic = random_case()
    iterations, alpha, lams, betas = (3, 2), 0.05, [1.0, 1.3], [0.5, 0.35]
    w_f, w_s = _loss_weights(attention.shape, semantic.shape)
    g_f, g_s, _, _ = _reference_gradients(attention, semantic, lams, betas, iterations, alpha, False, w_f, w_s)

    def loss(f, s):
        f_out, s_out = numpy_stack(f, s, lams, betas, iterations, alpha)
        return (f_out * w_f).sum() + (s_out * w_s).sum()

    h = 1e-5
    picks_f = [(0, 0, 0), (1, 2, 3), (0, 1, 2)]
    picks_s = [(0, 0, 0, 0), (1, 2, 1, 3), (0, 1, 2, 1)]
    fd_f, fd_s = [], []
    for idx in picks_f:
        step = np.zeros_like(attention)
        step[idx] = h
        fd_f.append((loss(attention + step, semantic) - loss(attention - step, semantic)) / (2 * h))
    for idx in picks_s:
        step = np.zeros_like(semantic)
        step[idx] = h
        fd_s.append((loss(attention, semantic + step) - loss(attention, semantic - step)) / (2 * h))
    # measured: 1.2e-10 (F), 1.1e-10 (S)
    assert rel_err([g_f[i] for i in picks_f], fd_f) < 2e-9
    assert rel_err([g_s[i] for i in picks_s], fd_s) < 2e-9
