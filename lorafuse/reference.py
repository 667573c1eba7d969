"""Plain-torch references for every fused op.

These are the definitions the kernels are tested against (in float64) and the path CPU tensors
take when the Triton interpreter is off. They follow DESIGN.md's formulas literally.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def shrink_reference(
    x: Tensor,
    a_cat: Tensor,
    scale: Tensor,
    a_map: Optional[Tensor] = None,
    b_map: Optional[Tensor] = None,
) -> Tensor:
    """S' = ((x a_cat^T) [a_map^T b_map^T]) * scale.  x: (T, d_in) -> (T, R)."""
    s = x @ a_cat.t()
    if a_map is not None:
        s = (s @ a_map.t()) @ b_map.t()
    return s * scale


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
    """y = x W^T + b + ((x a_cat^T [a_map^T b_map^T]) * scale) b_cat^T, in the inputs' dtype.

    x: (..., d_in); weight: (d_out, d_in); bias: (d_out,) or None; a_cat: (R, d_in);
    b_cat: (d_out, R); scale: (R,); a_map: (m, R); b_map: (R, m).  Returns (..., d_out).
    """
    return F.linear(x, weight, bias) + shrink_reference(x, a_cat, scale, a_map, b_map) @ b_cat.t()
