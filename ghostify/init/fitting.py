"""The least-squares maths shared by the ``copy`` and ``calib`` strategies.

Channel selection (greedy facility location, pivoted Cholesky), intrinsic->ghost pairing
(Hungarian), depthwise kernels fitted in weight space, ridge solves with the ridge chosen by
cross-validation, reduced-rank regression, and patch gathering at sampled output positions.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["select_intrinsic", "pair_ghosts", "fit_dw_kernels", "pivoted_cholesky", "ridge_solve", "choose_ridge",
           "reduced_rank", "patch_rows", "windows", "gram", "window_gram", "sample_positions", "conv_padding",
           "CV_ROWS", "RIDGES"]


def select_intrinsic(gram: torch.Tensor, m: int, rounds: int = 12) -> list[int]:
    """Pick ``m`` filters that best explain the others by scaling (greedy facility location).

    ``gram`` holds inner products: of filters (weight space) or of output channels
    (their covariance on calibration data). ``gain[c, j] = g[c, j]^2 / g[j, j]`` is the energy
    of ``c`` that a scaled copy of ``j`` explains; the objective is ``sum_c max_{j in I} gain[c, j]``. Each of
    ``rounds`` rounds computes every candidate's marginal gain at once and then accepts
    about ``m / rounds`` of the best, re-checking each against the picks of the round so
    that near-duplicates are not taken together. Returned in pick order: the least useful
    intrinsic filter comes last.
    """
    g = gram.float()
    gain_t = g * g / g.diagonal().clamp_min(1e-30)[:, None]  # row j: gain of every channel from j
    gain = gain_t.numpy()
    n = len(gain)
    best_t = torch.zeros(n)
    best = best_t.numpy()  # shares memory with best_t
    alive = np.ones(n, bool)
    chosen: list[int] = []
    per_round = max(1, -(-m // rounds))
    buf = torch.empty_like(gain_t)
    while len(chosen) < m:
        marginal = torch.sub(gain_t, best_t[None, :], out=buf).clamp_min_(0).sum(1).numpy()
        marginal = np.nan_to_num(marginal, nan=0.0, posinf=np.finfo(marginal.dtype).max)  # the alive sort first
        marginal[~alive] = -np.inf
        want = min(per_round, m - len(chosen))
        order = np.argsort(-marginal)[: 2 * want + 1]
        took = 0
        for j in order:
            if not alive[j]:
                continue
            row = gain[j]
            fresh = np.maximum(row - best, 0).sum()
            if took == 0 or fresh >= 0.5 * marginal[j]:
                chosen.append(int(j))
                alive[j] = False
                np.maximum(best, row, out=best)
                took += 1
                if took == want:
                    break
    return chosen


def pair_ghosts(gram: torch.Tensor, intrinsic: list[int], rest: list[int],
                per_parent: int) -> tuple[list[int], list[int]]:
    """Assign each non-intrinsic channel to a ghost slot (``per_parent`` slots per intrinsic, in order).

    Minimises the total scalar-fit residual ``g[c, c] - g[c, j]^2 / g[j, j]`` (``gram`` as in
    :func:`select_intrinsic`) with the Hungarian method; in weight space the scalar fit
    bounds the ``d x d`` fit from above. With fewer ghosts than intrinsic maps (a ratio below
    2) any intrinsic map may be a parent; the intrinsic list is reordered so that the parents
    come first, as the cheap op expects. Returns ``(intrinsic, slots)``: the intrinsic channels
    in internal order and the original channel of each ghost slot.
    """
    from scipy.optimize import linear_sum_assignment

    g = gram.double()
    diag = g.diagonal()
    cross = g[rest][:, intrinsic]
    cost = (diag[rest][:, None] - cross**2 / diag[intrinsic].clamp_min(1e-300)[None, :]).cpu().numpy()
    if per_parent == 1 and len(rest) < len(intrinsic):
        rows, cols = linear_sum_assignment(cost)  # each ghost to a distinct intrinsic map
        parents = [intrinsic[c] for c in cols]
        order = parents + [c for c in intrinsic if c not in set(parents)]
        return order, [rest[r] for r in rows]
    cost = cost[:, np.arange(len(rest)) // per_parent] if per_parent > 1 else cost[:, : len(rest)]
    rows, cols = linear_sum_assignment(cost)
    slots = [0] * len(rest)
    for r, c in zip(rows, cols):
        slots[c] = rest[r]
    return list(intrinsic), slots


def fit_dw_kernels(w: torch.Tensor, parents: torch.Tensor, targets: torch.Tensor, d: int, stride,
                   dilation) -> tuple[torch.Tensor, float]:
    """Least-squares ``d x d`` kernels ``K_k`` with ``K_k * w[parents[k]] ~ w[targets[k]]`` in weight space.

    The primary conv has stride ``S`` and dilation ``D``; cheap tap ``v`` applied to its
    output reads the input at ``S*v + D*u`` for primary tap ``u``. With ``P`` a filter
    drawn on the input grid (taps ``D`` apart), the composite is ``sum_v K[v] P(x - S v)``,
    linear in ``K``. Its normal equations need only correlations:

        gram[v, v'] = sum_y P(y) P(y + S (v - v'))      (autocorrelation of the parent)
        rhs[v]      = sum_y P(y) T(y + S (v - r))       (cross-correlation with the target)

    Both filters are zero off the lattice ``D*u``, so a product ``P(y) Q(y + s)`` can be
    non-zero only when the shift ``s`` is a multiple of ``D``, and then the sum is the
    correlation of the *undilated* ``k x k`` kernels at lag ``s / D`` (zero when
    ``|s / D| > k - 1``). The kernels are correlated once at every lag (per filter, the
    channel-summed products of every pair of taps, added up along each lag), and each
    ``(v, v')`` picks its lag: the work grows with the kernel, not with its dilated extent
    (a 3x3 conv at dilation 36 costs what a 3x3 conv costs). All in float64, so the residual
    of a ghost that is an exact multiple of its parent is 0 to ~1e-8.

    Returns the kernels ``(len(parents), d, d)`` and the relative residual over all ghosts.
    """

    (sh, sw), (dh, dw_), r = tuple(stride), tuple(dilation), d // 2
    wd = w.detach().double()
    n, cin, kh, kw = wd.shape
    if kh == kw == 1:
        # A 1x1 filter: off-centre cheap taps only reach grid points where the target is zero,
        # so they fit to 0 and the centre tap is the scalar fit <w_t, w_p> / |w_p|^2.
        flat = wd.reshape(n, cin)
        wp, wt = flat[parents], flat[targets]
        scale = (wp * wt).sum(1) / (wp * wp).sum(1).clamp_min(1e-30)
        k = wd.new_zeros(len(parents), d, d)
        k[:, r, r] = scale
        tt = (wt * wt).sum()
        err = ((wt - scale[:, None] * wp) ** 2).sum()
        return k, math.sqrt(err.item() / tt.item()) if tt > 0 else 0.0
    g = len(parents)
    if g == 0:
        return wd.new_zeros(0, d, d), 0.0

    # lag index (into a (2kh, 2kw) grid) of every pair of kernel taps (u, u'): l = u' - u, offset by k - 1
    uh, uw = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    uh, uw = uh.reshape(-1), uw.reshape(-1)
    pair_lag = ((uh[None, :] - uh[:, None] + kh - 1) * 2 * kw + uw[None, :] - uw[:, None] + kw - 1).reshape(-1)

    def correlate(a, b):  # (len(a), 2kh, 2kw): c[i, k-1+l] = sum_u a_i(u) b_i(u + l); last row/column 0
        # summed over channels first, one k^2 x k^2 matrix per filter (a batched matmul in float64),
        # then each lag adds up the pairs of taps l apart
        m = torch.bmm(wd[a].flatten(2).transpose(1, 2), wd[b].flatten(2)).reshape(len(a), -1)
        out = wd.new_zeros(len(a), 4 * kh * kw)  # the last row and column stay 0: lags off the lattice or kernel
        return out.index_add_(1, pair_lag, m).reshape(len(a), 2 * kh, 2 * kw)

    def lag(shifts, s, dil, k):  # index into correlate's output for input shifts s*shifts
        x = s * shifts
        ok = (x % dil == 0) & ((x // dil).abs() <= k - 1)
        return torch.where(ok, x // dil + k - 1, torch.full_like(x, 2 * k - 1))

    taps = torch.arange(d)
    cross = correlate(parents, targets)
    rhs = cross[:, lag(taps - r, sh, dh, kh)[:, None], lag(taps - r, sw, dw_, kw)[None, :]].reshape(g, d * d, 1)
    uniq, inv = torch.unique(parents, return_inverse=True)
    auto = correlate(uniq, uniq)
    vh, vw = torch.meshgrid(taps, taps, indexing="ij")
    vh, vw = vh.reshape(-1), vw.reshape(-1)
    gram = auto[:, lag(vh[:, None] - vh[None, :], sh, dh, kh), lag(vw[:, None] - vw[None, :], sw, dw_, kw)][inv]
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
    k = torch.linalg.solve(gram + ridge * torch.eye(d * d, dtype=gram.dtype), rhs)
    tt = (wd[targets] ** 2).sum()
    err = tt - 2 * (k * rhs).sum() + (k.transpose(1, 2) @ gram @ k).sum()
    return k.reshape(g, d, d), math.sqrt(max(err.item(), 0.0) / tt.item()) if tt > 0 else 0.0




def conv_padding(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) zero padding of ``conv``, 'same'/'valid' included."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        out = []
        for k, d in zip(conv.kernel_size[::-1], conv.dilation[::-1]):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def patch_rows(conv: nn.Conv2d, x: torch.Tensor, pos: torch.Tensor, out_width: int,
               images: torch.Tensor | None = None) -> torch.Tensor:
    """Input patches of ``conv`` at output positions ``pos`` (per image), as rows ``(N*P, C*kh*kw)`` for the images
    ``images`` (default all, in order); the columns are ordered like ``conv.weight.reshape(n, -1)``: channel,
    then kernel row, column."""
    pad = conv_padding(conv, x)
    xp = F.pad(x, pad) if any(pad) else x
    win = windows(xp, conv.kernel_size, conv.stride, conv.dilation, pos, out_width, images)
    return win.reshape(win.shape[0] * win.shape[1], -1)


def windows(xp: torch.Tensor, kernel, stride, dilation, pos: torch.Tensor, out_width: int,
            images: torch.Tensor | None = None, channels_first: bool = False) -> torch.Tensor:
    """The ``kh x kw`` windows of an already padded ``xp`` at output positions ``pos``: ``(N, P, C, kh, kw)``,
    or ``(C, N, P, kh, kw)`` with ``channels_first`` (then for all images).

    One gather from a strided view of every window (``F.unfold`` would copy every patch, the
    sampled ones only are copied here), already in row order.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    view = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]  # (N, C, Ho, Wo, ..)
    pos = pos.to(xp.device)
    r, c = pos // out_width, pos % out_width
    if channels_first:
        return view.transpose(0, 1)[:, :, r, c]
    view = view.permute(0, 2, 3, 1, 4, 5)  # (N, Ho, Wo, C, kh, kw)
    if images is None:
        return view[:, r, c]
    return view[images[:, None], r[None], c[None]]


def gram(p: torch.Tensor) -> torch.Tensor:
    """``p^T p`` in float64, computed in ``p``'s precision; float32 on the CPU through BLAS ``syrk``, which
    computes one triangle only (half the multiply-adds of a matmul)."""
    if p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous() or p.dim() != 2 or not len(p):
        return (p.mT @ p).double()
    from scipy.linalg.blas import ssyrk

    upper = torch.from_numpy(ssyrk(1.0, p.numpy().T, trans=0))  # p^T p, lower triangle zero
    full = upper + upper.T
    full.diagonal().sub_(upper.diagonal())
    return full.double()


def window_gram(x: torch.Tensor, kernel, dilation, out_size) -> torch.Tensor:
    """``p^T p`` over the windows ``p`` of a padded ``x`` at every output position, stride 1, in float64 (the
    products in ``x``'s precision); columns ordered like :func:`patch_rows`' (channel, then kernel row, column).

    Without gathering the windows: block ``(u, v)`` (taps ``u``, ``v``) sums ``x[r] x[r + v - u]^T``
    over the positions ``r`` that tap ``u`` reads. Every tap reads a common core of positions, so
    each of the ``(2k-1)^2`` shifts is multiplied over the core once (half of them: the other half
    are transposes), and each pair of taps adds its own border strips. For a 3x3 conv on a 14x14
    map that is about half the multiply-adds of ``p^T p`` by ``syrk``. The output must be larger
    than the kernel's dilated extent less one (else there is no core).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> conv = nn.Conv2d(2, 3, 3, padding=1)
        >>> xp = torch.nn.functional.pad(torch.randn(2, 2, 6, 6), (1, 1, 1, 1))
        >>> p = patch_rows(conv, xp[..., 1:-1, 1:-1], torch.arange(36), 6)
        >>> torch.allclose(window_gram(xp, (3, 3), (1, 1), (6, 6)), (p.T @ p).double(), atol=1e-4)
        True
    """
    (kh, kw), (dh, dw), (ho, wo) = kernel, dilation, out_size
    taps = [(a * dh, b * dw) for a in range(kh) for b in range(kw)]
    c, k = x.shape[1], len(taps)
    xs = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view of channels-last activations

    def prod(r0, r1, c0, c1, dr, dc):  # sum over the rectangle of x[r, s] x[r + dr, s + dc]^T
        if r1 <= r0 or c1 <= c0:
            return 0
        lhs = xs[:, r0:r1, c0:c1].reshape(-1, c)
        return lhs.T @ xs[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc].reshape(-1, c)

    r_core, c_core = (kh - 1) * dh, (kw - 1) * dw  # every tap reads [r_core, ho) x [c_core, wo)
    if ho <= r_core or wo <= c_core:
        raise ValueError(f"window_gram needs an output larger than {r_core} x {c_core}, got {ho} x {wo}")
    core: dict = {}
    out = torch.empty(c, k, c, k, dtype=x.dtype, device=x.device)
    for i, (ra, ca) in enumerate(taps):
        for j in range(i, k):
            dr, dc = taps[j][0] - ra, taps[j][1] - ca
            if (dr, dc) not in core:
                core[dr, dc] = prod(r_core, ho, c_core, wo, dr, dc)
            blk = (core[dr, dc] + prod(ra, r_core, ca, ca + wo, dr, dc) + prod(ho, ra + ho, ca, ca + wo, dr, dc)
                   + prod(r_core, ho, ca, c_core, dr, dc) + prod(r_core, ho, wo, ca + wo, dr, dc))
            out[:, i, :, j] = blk
            out[:, j, :, i] = blk.T
    return out.reshape(c * k, c * k).double()


def sample_positions(total: int, per_image: int, gen: torch.Generator) -> torch.Tensor:
    return torch.arange(total) if total <= per_image else torch.randperm(total, generator=gen)[:per_image]


def ridge_solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(a + l I) w = b`` with ``l = ridge * mean(diag a)``; Cholesky (half the work of LU) when it succeeds."""
    reg = a.clone()
    reg.diagonal().add_(ridge * a.diagonal().mean().clamp_min(1e-12))
    chol, bad = torch.linalg.cholesky_ex(reg)
    return torch.linalg.solve(reg, b) if bad.item() else torch.cholesky_solve(b, chol)


def pivoted_cholesky(cov: torch.Tensor, m: int) -> list[int]:
    """Greedy column-subset selection: each step takes the channel with the largest unexplained variance."""
    n = len(cov)
    resid = cov.diagonal().clone()
    factors = cov.new_zeros(n, m)
    chosen: list[int] = []
    for i in range(m):
        r = resid.clone()
        r[chosen] = -math.inf
        j = int(torch.argmax(r))
        chosen.append(j)
        if resid[j] <= 1e-12 * cov.diagonal().max():
            continue
        col = (cov[:, j] - factors[:, :i] @ factors[j, :i]) / resid[j].sqrt()
        factors[:, i] = col
        resid = (resid - col**2).clamp_min(0)
    return chosen


CV_ROWS = 100  # below this many rows per unknown, the ridge is chosen by two-fold cross-validation
RIDGES = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def choose_ridge(a, b, scale, ridge: float, channels: int = 128) -> float:
    """The ridge (from ``ridge`` and :data:`RIDGES`) whose fit on one half of the images best predicts the other.

    ``a[k], b[k]`` are the normal equations of half ``k``; the error of a fit ``W`` on half ``o``
    is ``tr(W^T A_o W) - 2 tr(W^T B_o)`` (plus a constant), channels weighted by ``scale``. The
    error is summed over at most ``channels`` output channels (a fixed random subset: the
    solves and products scale with it, the factorisations do not), and the candidates are
    searched from the middle of the list downhill (the cross-validated error of a ridge fit has
    one minimum), so that about half of them are factorised.

    Example:
        >>> import torch
        >>> p = torch.randn(2, 50, 8, dtype=torch.float64)
        >>> t = p @ torch.randn(8, 3, dtype=torch.float64)  # exact targets: the smallest ridge wins
        >>> choose_ridge(p.mT @ p, p.mT @ t, torch.ones(3, dtype=torch.float64), 1e-6)
        1e-06
    """
    if b.shape[-1] > channels:
        keep = torch.randperm(b.shape[-1], generator=torch.Generator().manual_seed(0))[:channels].to(b.device)
        b, scale = b[..., keep], scale[keep]
    w2 = (scale**2)[None, :]
    lams = sorted({ridge, *RIDGES})
    errs: dict[int, float] = {}

    def err(i: int) -> float:
        if i not in errs:
            errs[i] = 0.0
            for k in (0, 1):
                w = ridge_solve(a[k], b[k], lams[i])
                errs[i] += (((a[1 - k] @ w) * w - 2 * b[1 - k] * w) * w2).sum().item()
        return errs[i]

    i = len(lams) // 2
    step = 1 if i + 1 < len(lams) and err(i + 1) < err(i) else -1
    while 0 <= i + step < len(lams) and err(i + step) < err(i):
        i += step
    return lams[i]


def reduced_rank(a, b, m: int, scale, ridge: float, count: int, centred: bool,
                 fixed_order: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Intrinsic filters and channels for ``mix``: the best rank-``m`` linear map, in the BN-weighted metric.

    The full least-squares fit ``W`` predicts all ``n`` channels; the top ``m`` principal
    directions ``U`` of its weighted predictions (centred when the mix's bias can carry the
    mean) give the rank-``m`` map ``W S U U^T S^-1``, which any ``m`` channels whose rows of ``U``
    are independent can carry, the rest being linear mixes of them. The channels are chosen by
    pivoted Cholesky on ``U U^T`` (greedy maximal volume), which keeps the mixing weights small.
    With ``fixed_order`` (a layer whose channel order cannot move) the first ``m`` channels carry
    it: the map is the same rank-``m`` one, only the mixing weights grow when those channels'
    rows of ``U`` are nearly dependent.
    """
    w = ridge_solve(a, b, ridge)  # (d, n)
    ws = w * scale[None, :]
    second = a / count
    if centred:  # the last row of ``a`` sums the patches (their trailing 1)
        mu = a[-1] / count
        second = second - torch.outer(mu, mu)
    pred = ws.T @ second @ ws  # (n, n): covariance of the weighted predictions
    u = torch.linalg.eigh(pred.float())[1][:, -m:].double()  # float32: 2-3x faster, the top-m subspace is kept
    intrinsic = list(range(m)) if fixed_order else pivoted_cholesky(u @ u.T, m)
    proj = (scale[:, None] * u) @ (u.T / scale[None, :])  # S U U^T S^-1
    w_r = w @ proj
    if centred:  # project only the variation: (P w - mean) proj + mean
        w_r[-1] += mu @ w - (mu @ w) @ proj
    return w_r[:, intrinsic], intrinsic
