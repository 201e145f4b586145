"""The per-layer metrics of one batch of states: rank-collapse residual ratio, mean cosine, RMS.

* the rank-collapse residual ratio ||res(X_l)|| / ||X_l|| of the layer's output X_l (T x d per
  sentence), res(X) = X - 1 x^T with x minimising the norm (Dong et al. 2021). Primary norm:
  Frobenius, whose minimiser is the token mean. ``--norm l1inf``: Dong et al.'s composite
  ||A||_{1,inf} = sqrt(||A||_1 ||A||_inf); it has no closed-form minimiser, so x is the best
  of the coordinate-wise median (which minimises the ||.||_1 factor exactly), the token mean
  and 0, an upper bound on the exact minimum (and the ratio is <= 1);
* the mean pairwise cosine similarity of the token representations (i != j);
* the root mean square of the states' entries.

Ratios are averaged over the sentences of the batch (padding excluded).
"""

from typing import Sequence

import torch


def residual_ratio(x: torch.Tensor, norm: str = "fro") -> float:
    """||X - 1 x^T|| / ||X|| for one sentence X (T x d); x minimises the norm (see module doc)."""
    x = x.double().contiguous()  # (median of a stride-0 expanded view is wrong in torch)
    if not torch.isfinite(x).all():
        return float("nan")  # the stack overflowed (unnormalised attention can)
    if norm == "fro":
        res = x - x.mean(dim=0, keepdim=True)
        return (res.norm() / x.norm()).item() if x.norm() > 0 else 0.0
    if norm == "l1inf":

        def composite(a):
            return torch.sqrt(a.abs().sum(0).max() * a.abs().sum(1).max())

        den = composite(x)
        if den == 0:
            return 0.0
        # no closed-form minimiser: the best of three candidates, an upper bound on the minimum
        candidates = (x.median(dim=0, keepdim=True).values, x.mean(dim=0, keepdim=True), torch.zeros_like(x[:1]))
        return min(composite(x - c).item() for c in candidates) / den.item()
    raise ValueError(f"--norm: unknown norm {norm!r}; choose from fro, l1inf")


def mean_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over the pairs i != j of the rows of X (T x d)."""
    t = x.size(0)
    if t < 2 or not torch.isfinite(x).all():
        return float("nan")
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    sim = u @ u.t()
    return ((sim.sum() - sim.diagonal().sum()) / (t * (t - 1))).item()


def batch_metrics(states: torch.Tensor, spans: Sequence[tuple], norm: str):
    """(mean residual ratio, mean cosine, root mean square of the entries) over the sentences of
    states (T, B, d); sentence b occupies the positions spans[b] = (start, end) (fairseq left-pads
    sources, right-pads targets). The RMS says how large the states are: a signed map whose rows
    sum to less than one shrinks them layer after layer, which the ratios, being relative, hide."""
    ratios, cosines, squares, count = [], [], 0.0, 0
    for b, (start, end) in enumerate(spans):
        x = states[start:end, b]
        ratios.append(residual_ratio(x, norm))
        cosines.append(mean_cosine(x))
        squares += x.double().pow(2).sum().item()
        count += x.numel()
    n = len(ratios)
    return sum(ratios) / n, sum(cosines) / n, (squares / count) ** 0.5
