"""Plain-torch references for every fused op.

These are the definitions the kernels are tested against (in float64) and the path CPU tensors
take when the Triton interpreter is off. They spell out the formulas of the README and the ops'
docstrings literally.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def shrink_reference(
    x: Tensor,
    a_cat: Tensor,
    scale: Tensor,
    a_map: Optional[Tensor] = None,
    b_map: Optional[Tensor] = None,
) -> Tensor:
    """S' = ((x a_cat^T) [a_map^T b_map^T]) * scale.  x: (T, d_in) -> (T, R), in float32 (float64
    when any input is float64), whatever mix of dtypes the inputs have."""
    ts = [t for t in (x, a_cat, scale, a_map, b_map) if t is not None]
    acc = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    s = x.to(acc) @ a_cat.to(acc).t()
    if a_map is not None:
        s = (s @ a_map.to(acc).t()) @ b_map.to(acc).t()
    return s * scale.to(acc)


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    a_cat: Tensor,
    b_cat: Tensor,
    scale: Tensor,
    a_map: Optional[Tensor] = None,
    b_map: Optional[Tensor] = None,
) -> Tensor:
    """y = x W^T + b + ((x a_cat^T [a_map^T b_map^T]) * scale) b_cat^T, in x's dtype (the low-rank
    path in float32, or float64 when any of its inputs is float64).

    x: (..., d_in); weight: (d_out, d_in); bias: (d_out,) or None; a_cat: (R, d_in);
    b_cat: (d_out, R); scale: (R,); a_map: (m, R); b_map: (R, m).  Returns (..., d_out).
    """
    sp = shrink_reference(x, a_cat, scale, a_map, b_map)
    return F.linear(x, weight, bias) + (sp @ b_cat.to(sp.dtype).t()).to(x.dtype)
