"""How much LoRA adapters interfere when they are summed: cosines, norms and subspace overlaps of their
weight deltas Delta W_i = s_i B_i A_i, computed without forming any d_out x d_in matrix.

Frobenius inner products come from r x r products only:
    <B1 A1, B2 A2>_F = trace(A1^T B1^T B2 A2) = trace((B1^T B2)(A2 A1^T)),
so a layer costs O((d_in + d_out) r1 r2) instead of O(d_in d_out). Naive summation works best when the
deltas are close to orthogonal (cosine near 0) and their column spaces overlap little.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .adapters import LoraAdapter, load_adapters

__all__ = ["delta_cosine", "DeltaAnalysis", "lowrank_inner", "subspace_cosines"]


def lowrank_inner(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> Tensor:
    """<B1 A1, B2 A2>_F for A_i (r_i, d_in), B_i (d_out, r_i), in float64, from r1 x r2 products only."""
    a1, b1, a2, b2 = (t.detach().double() for t in (a1, b1, a2, b2))
    return torch.einsum("ij,ji->", b1.t() @ b2, a2 @ a1.t())


def _eps(dtype: torch.dtype) -> float:
    """Relative precision that a factor of this dtype's products were computed in: float32's for
    float32 and narrower factors, float64's for float64."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _orth(m: Tensor, eps: Optional[float] = None) -> Tensor:
    """Orthonormal basis (d, k) of the column space of m (d, r), numerically rank-deficient columns
    dropped: singular values below min(d, r) * eps * the largest (eps: _eps(m.dtype) by default), so
    that the rounding left in factors made by products (a rank="full" merge's, near eps) is not
    counted as directions, while weak but stored directions (a steep spectrum) are."""
    eps = _eps(m.dtype) if eps is None else eps
    u, sv, _ = torch.linalg.svd(m.double(), full_matrices=False)
    if sv.numel() == 0 or sv[0] == 0:
        return u[:, :0]
    return u[:, sv > min(m.shape) * eps * sv[0]]


def subspace_cosines(m1: Tensor, m2: Tensor) -> Tensor:
    """Cosines of the principal angles between the column spaces of m1 (d, r1) and m2 (d, r2), descending.

    1 means a shared direction, 0 orthogonal; min(rank1, rank2) values, float64.
    """
    if m1.shape[0] != m2.shape[0]:
        raise ValueError(f"subspace_cosines: both matrices need the same row count, got {tuple(m1.shape)} and "
                         f"{tuple(m2.shape)}")
    return torch.linalg.svdvals(_orth(m1).t() @ _orth(m2)).clamp(max=1.0)


def _delta_spaces(a: Tensor, b: Tensor):
    """Orthonormal bases (d_out, k) and (d_in, k) of the column and row spaces of B A, without forming B A.

    With A^T = Q_a R_a and B = Q_b R_b: B A = (B R_a^T) Q_a^T, so col(B A) = col(B R_a^T), and
    row(B A) = col(A^T R_b^T). Exact even when A or B is rank-deficient.
    """
    eps = _eps(a.dtype)
    a, b = a.detach().double(), b.detach().double()
    r_a = torch.linalg.qr(a.t(), mode="r")[1]
    r_b = torch.linalg.qr(b, mode="r")[1]
    # Orthonormal bases here, at the factors' precision (in float64 their rounding looks like rank).
    return _orth(b @ r_a.t(), eps), _orth(a.t() @ r_b.t(), eps)


@dataclass
class DeltaAnalysis:
    """Pairwise comparison of K adapters' weight deltas. All matrices are K x K float64 tensors.

    names: the adapters, in order. modules: every module any adapter targets.
    cosine[module]: cos(Delta W_i, Delta W_j) on that layer (NaN where one adapter does not target it).
    norms[module]: (K,) ||Delta W_i||_F (0 where the adapter does not target the layer).
    overall_cosine: the cosine of the whole deltas (all layers stacked into one vector).
    rms_cosine: sqrt(mean over layers carried by both of cos^2): typical per-layer alignment, sign-free.
    overall_norm: (K,) ||Delta W_i||_F over all layers.
    column_overlap[module] / row_overlap[module]: mean cos^2 of the principal angles between the
        column spaces (output directions) / row spaces (input directions) of Delta W_i and Delta W_j,
        in [0, 1]: 0 orthogonal subspaces, 1 one contains the other. NaN where absent.
    mean_column_overlap / mean_row_overlap: those averaged over the layers carried by both.
    """

    names: List[str]
    modules: List[str]
    cosine: Dict[str, Tensor]
    norms: Dict[str, Tensor]
    overall_cosine: Tensor
    rms_cosine: Tensor
    overall_norm: Tensor
    column_overlap: Dict[str, Tensor]
    row_overlap: Dict[str, Tensor]
    mean_column_overlap: Tensor
    mean_row_overlap: Tensor

    def summary(self) -> str:
        """A short table of the pairwise numbers, one line per pair."""
        lines = [f"{'pair':<30} {'overall cos':>11} {'rms cos':>8} {'col overlap':>11} {'row overlap':>11}"]
        K = len(self.names)
        for i in range(K):
            for j in range(i + 1, K):
                pair = f"{self.names[i]} / {self.names[j]}"
                row = (self.overall_cosine[i, j], self.rms_cosine[i, j], self.mean_column_overlap[i, j],
                       self.mean_row_overlap[i, j])
                lines.append(f"{pair:<30} {row[0]:>11.4f} {row[1]:>8.4f} {row[2]:>11.4f} {row[3]:>11.4f}")
        return "\n".join(lines)


def _nanmean_stack(mats: List[Tensor], K: int) -> Tensor:
    if not mats:
        return torch.full((K, K), math.nan, dtype=torch.float64)
    return torch.stack(mats).nanmean(0)


@torch.no_grad()
def delta_cosine(adapters: Sequence[Any], modules: Optional[Sequence[str]] = None) -> DeltaAnalysis:
    """Compare K adapters' weight deltas layer by layer and overall (see DeltaAnalysis).

    Args:
        adapters: peft adapter directories, (state_dict, config) pairs or LoraAdapters (K >= 1), or a
            model composed by lorafuse.compose (its adapters are used).
        modules: restrict to these module paths (default: every module any adapter targets).
    """
    if isinstance(adapters, torch.nn.Module):
        from .compose import get_composition

        loaded: List[LoraAdapter] = get_composition(adapters).adapters
    else:
        loaded = load_adapters(adapters)
    K = len(loaded)
    all_modules: List[str] = []
    for ad in loaded:
        all_modules += [k for k in ad.layers if k not in all_modules]
    if modules is not None:
        if isinstance(modules, str):
            raise TypeError(f"modules must be a list of module paths, got the string {modules!r} (use [{modules!r}])")
        modules = list(modules)
        if not modules:
            raise ValueError("modules is empty: pass None for every module, or at least one module path")
        unknown = [m for m in modules if m not in all_modules]
        if unknown:
            raise ValueError(f"modules: {unknown[:3]} are targeted by none of the adapters")
        repeated = sorted({m for m in modules if modules.count(m) > 1})
        if repeated:
            # each layer counts once in the overall cosine and the RMS over layers
            raise ValueError(f"modules: {repeated[:3]} are listed more than once")
        all_modules = list(modules)

    nan = math.nan
    inner_total = torch.zeros(K, K, dtype=torch.float64)
    cosine, norms, col_overlap, row_overlap = {}, {}, {}, {}
    cos_sq = []
    for key in all_modules:
        present = [i for i, ad in enumerate(loaded) if key in ad.layers]
        shapes = {(ad.layers[key][1].shape[0], ad.layers[key][0].shape[1]) for ad in loaded if key in ad.layers}
        if len(shapes) > 1:
            raise ValueError(f"module {key!r}: the adapters disagree on its shape (d_out, d_in): {sorted(shapes)}")
        gram = torch.full((K, K), nan, dtype=torch.float64)
        col = torch.full((K, K), nan, dtype=torch.float64)
        row = torch.full((K, K), nan, dtype=torch.float64)
        spaces = {i: _delta_spaces(*loaded[i].layers[key][:2]) for i in present}
        for i in present:
            a_i, b_i, s_i = loaded[i].layers[key]
            for j in present:
                if j < i:
                    continue
                a_j, b_j, s_j = loaded[j].layers[key]
                gram[i, j] = gram[j, i] = s_i * s_j * lowrank_inner(a_i, b_i, a_j, b_j)
                c = subspace_cosines(spaces[i][0], spaces[j][0])
                r = subspace_cosines(spaces[i][1], spaces[j][1])
                col[i, j] = col[j, i] = (c ** 2).mean() if c.numel() else 0.0
                row[i, j] = row[j, i] = (r ** 2).mean() if r.numel() else 0.0
        layer_norm = torch.zeros(K, dtype=torch.float64)
        layer_norm[present] = gram.diagonal()[present].clamp(min=0).sqrt()
        denom = layer_norm[:, None] * layer_norm[None, :]
        cos = gram / denom
        cos[denom == 0] = nan
        cosine[key], norms[key] = cos, layer_norm
        col_overlap[key], row_overlap[key] = col, row
        inner_total += torch.nan_to_num(gram, nan=0.0)
        cos_sq.append(cos ** 2)

    overall_norm = inner_total.diagonal().clamp(min=0).sqrt()
    denom = overall_norm[:, None] * overall_norm[None, :]
    overall = inner_total / denom
    overall[denom == 0] = nan
    return DeltaAnalysis(
        names=[ad.name for ad in loaded], modules=all_modules, cosine=cosine, norms=norms,
        overall_cosine=overall, rms_cosine=_nanmean_stack(cos_sq, K).sqrt(), overall_norm=overall_norm,
        column_overlap=col_overlap, row_overlap=row_overlap,
        mean_column_overlap=_nanmean_stack(list(col_overlap.values()), K),
        mean_row_overlap=_nanmean_stack(list(row_overlap.values()), K),
    )
