"""The normal equations of one layer's least-squares fit, streamed over calibration batches on their device.

Per batch, at the sampled output positions: the input patches ``p`` (with a bias 1) and the conv's outputs
``t`` as rows, summed into ``A = [p 1]^T [p 1]`` and ``B = [p 1]^T t`` for each half of the images (the ridge
is cross-validated between the halves), with ``t^T t`` and ``sum t`` for the output covariance. Products in
float32, sums in float64. Where every output position is sampled (stride 1), the sums come from the whole
input instead of gathered windows (:func:`accumulate_windows`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fitting import conv_padding, gram, patch_rows, sample_positions, window_gram

__all__ = ["normal_equations", "output_rows", "accumulate", "accumulate_windows", "every_window"]


def normal_equations(conv: nn.Conv2d, xs, ys, positions: int, gen: torch.Generator):
    """Normal equations ``A``, ``B`` (one pair per half of the images), ``sum y y^T``, ``sum y``, the row
    count and the sampled positions of each batch, streamed over the batches on their device."""
    n, dev = ys[0].shape[1], ys[0].device
    d_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
    a = torch.zeros(2, d_in, d_in, dtype=torch.float64, device=dev)  # two halves of the images, for the ridge
    b = torch.zeros(2, d_in, n, dtype=torch.float64, device=dev)
    yy = torch.zeros(n, n, dtype=torch.float64, device=dev)
    ysum = torch.zeros(n, dtype=torch.float64, device=dev)
    count = seen = 0
    pos_per_batch = []
    for x, y in zip(xs, ys):
        pos = sample_positions(y.shape[2] * y.shape[3], positions, gen)
        pos_per_batch.append(pos)
        # image i of the run is in half i % 2; the rows of each half are made contiguous
        half = (torch.arange(len(x), device=dev) + seen) % 2
        order = torch.argsort(half, stable=True)
        cut = int((half == 0).sum()) * len(pos)
        # products in float32 (the bulk of the time, 2x faster than float64), sums in float64
        t = output_rows(y, pos, order)
        if every_window(conv, y, pos):
            xp = F.pad(x.float()[order], conv_padding(conv, x)).contiguous(memory_format=torch.channels_last)
            n0 = cut // len(pos)
            accumulate_windows(a[0], b[0], xp[:n0], t[:cut], conv)
            accumulate_windows(a[1], b[1], xp[n0:], t[cut:], conv)
        else:
            p = patch_rows(conv, x.float(), pos, y.shape[3], order)
            accumulate(a[0], b[0], p[:cut], t[:cut])
            accumulate(a[1], b[1], p[cut:], t[cut:])
        yy += (t.T @ t).double()
        ysum += t.sum(0).double()
        count += len(t)
        seen += len(x)
    return a, b, yy, ysum, count, pos_per_batch


def output_rows(y: torch.Tensor, pos: torch.Tensor, images: torch.Tensor | None = None, channels=None) -> torch.Tensor:
    """``y`` at positions ``pos`` as float32 rows ``(N*P, channels)``, image-major (images in ``images``' order)."""
    dev = y.device
    images = torch.arange(len(y), device=dev) if images is None else images
    channels = torch.arange(y.shape[1], device=dev) if channels is None else torch.as_tensor(channels, device=dev)
    rows = y.flatten(2)[images[:, None, None], channels[None, None, :], pos.to(dev)[None, :, None]]  # (N, P, C)
    return rows.reshape(-1, len(channels)).float()


def accumulate(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> None:
    """``a += [p 1]^T [p 1]``, ``b += [p 1]^T t`` (float64 sums of float32 products), without building ``[p 1]``;
    ``p`` is ``(..., rows, d)``, ``t`` is ``(..., rows, k)``, leading dimensions batched."""
    if not p.shape[-2]:
        return
    a[..., :-1, :-1] += gram(p)
    s = p.sum(-2).double()  # float32 cascade sum (as accurate here, without a float64 copy of p)
    a[..., :-1, -1] += s
    a[..., -1, :-1] += s
    a[..., -1, -1] += p.shape[-2]
    b[..., :-1, :] += (p.mT @ t).double()
    b[..., -1, :] += t.sum(-2).double()


def every_window(conv: nn.Conv2d, y: torch.Tensor, pos: torch.Tensor) -> bool:
    """Whether the statistics can come from the whole input (:func:`accumulate_windows`): every output position
    sampled, stride 1, one group, a kernel wider than 1x1 and smaller than the output."""
    (kh, kw), (dh, dw), (ho, wo) = conv.kernel_size, conv.dilation, y.shape[2:]
    return (len(pos) == ho * wo and tuple(conv.stride) == (1, 1) and conv.groups == 1 and kh * kw > 1
            and ho > (kh - 1) * dh and wo > (kw - 1) * dw)


def accumulate_windows(a: torch.Tensor, b: torch.Tensor, xp: torch.Tensor, t: torch.Tensor, conv: nn.Conv2d) -> None:
    """:func:`accumulate` of every window of the padded images ``xp`` (stride 1), ``t`` their outputs as rows
    (image, row, column): the Gram matrix by :func:`window_gram` and ``[p 1]^T t`` as the conv's weight
    gradient for the outputs ``[t 1]``, without gathering the windows."""
    if not len(t):
        return
    n, k = t.shape[1], conv.kernel_size
    ho, wo = xp.shape[2] - conv.dilation[0] * (k[0] - 1), xp.shape[3] - conv.dilation[1] * (k[1] - 1)
    ext = torch.cat([t, t.new_ones(len(t), 1)], 1).reshape(len(xp), ho, wo, n + 1).permute(0, 3, 1, 2)
    pt = torch.nn.grad.conv2d_weight(xp, (n + 1, xp.shape[1], *k), ext, dilation=conv.dilation)
    pt = pt.reshape(n + 1, -1).T.double()  # (C*kh*kw, n + 1): [p^T t, p^T 1]
    a[:-1, :-1] += window_gram(xp, k, conv.dilation, (ho, wo))
    a[:-1, -1] += pt[:, -1]
    a[-1, :-1] += pt[:, -1]
    a[-1, -1] += len(t)
    b[:-1, :] += pt[:, :-1]
    b[-1, :] += t.sum(0).double()
