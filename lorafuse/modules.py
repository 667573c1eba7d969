"""MultiLoraLinear: an nn.Linear carrying K LoRA adapters composed one of several ways, run by
lorafuse.lora_linear (one fused pass on the GPU)."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .ops import lora_linear

AdapterTriple = Tuple[Tensor, Tensor, float]

METHODS = ("sum", "weighted", "concat", "loramap", "route")
MAP_INITS = ("lora", "sum")


def check_weights(weights, K: int) -> list:
    """Per-adapter weights (a sequence or tensor of K numbers) as K finite floats, or a ValueError
    (shared by MultiLoraLinear, compose and merge_adapters)."""
    try:
        if isinstance(weights, (str, bytes)):
            raise TypeError
        weights = [float(w) for w in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    except (TypeError, ValueError):
        raise TypeError(f"weights must be a sequence (or 1-D tensor) of {K} numbers, one per adapter, "
                        f"got {weights!r}") from None
    if len(weights) != K:
        raise ValueError(f"weights must have one entry per adapter ({K}), got {len(weights)}")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    return weights


def _check_adapters(adapters, d_in: int, d_out: int):
    if isinstance(adapters, (tuple, list)) and len(adapters) == 3 and isinstance(adapters[0], Tensor):
        raise TypeError("adapters must be a list of (A, B, scale) triples; wrap a single adapter in a list")
    try:
        adapters = list(adapters)
    except TypeError:
        raise TypeError(f"adapters must be a list of (A, B, scale) triples, got {type(adapters).__name__}") from None
    if not adapters:
        raise ValueError("adapters must hold at least one (A, B, scale) triple, got an empty list")
    out = []
    for i, ad in enumerate(adapters):
        if not isinstance(ad, (tuple, list)) or len(ad) != 3:
            raise TypeError(f"adapters[{i}] must be an (A, B, scale) triple, got {type(ad).__name__}")
        a, b, s = ad
        if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[1] != d_in:
            raise ValueError(f"adapters[{i}] A must have shape (r, {d_in}) (d_in of the base layer), "
                             f"got {tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}")
        r = a.shape[0]
        if r == 0:
            raise ValueError(f"adapters[{i}] has rank 0")
        if not isinstance(b, Tensor) or tuple(b.shape) != (d_out, r):
            raise ValueError(f"adapters[{i}] B must have shape ({d_out}, {r}) (d_out, rank of its A), "
                             f"got {tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
        for name, t in (("A", a), ("B", b)):
            if not t.is_floating_point():
                raise ValueError(f"adapters[{i}] {name} must be a real floating-point tensor, got {t.dtype}")
        if isinstance(s, Tensor):
            if s.numel() != 1:
                raise ValueError(f"adapters[{i}] scale must be a number, got a tensor of shape {tuple(s.shape)}")
            s = float(s)
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"adapters[{i}] scale must be a finite number, got {s!r}")
        out.append((a, b, float(s)))
    return out


class WrapsBaseLayer(nn.Module):
    """A layer built around an nn.Linear held as `base_layer`, whose weight and bias it passes through
    as peft's LoRA layers do: model code that reads a wrapped layer's weight directly (Mamba's dt_proj)
    reads the base's, and code that sets it (transformers' tie_weights on a wrapped lm_head) sets the
    base's."""

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)


class MultiLoraLinear(WrapsBaseLayer):
    """An nn.Linear with K LoRA adapters, y = base(x) + ((x a_cat^T [a_map^T b_map^T]) * scale) b_cat^T.

    Args:
        base: the frozen nn.Linear (d_out x d_in).
        adapters: list of (A (r_i, d_in), B (d_out, r_i), s_i) in the order given; s_i is the
            adapter's own scale (peft: lora_alpha / r, rsLoRA: lora_alpha / sqrt(r)).
        method: "sum" (naive summation, nothing trains), "weighted" (scale_i = s_i * w_i, the K
            weights train; LoraHub and averaging), "concat" (LoraConcat: a_cat and b_cat train),
            "loramap" (LoraMap: only a_map (m, R) and b_map (R, m) train).
        weights: K numbers for "weighted" (default 1/K each: averaging).
        map_rank: m for "loramap" (required).
        map_init: "lora" (default): a_map Kaiming-uniform and b_map zero, as LoRA initialises A and B,
            so the layer starts as the base layer and the mapping learns from there; "sum": the best
            rank-m approximation of the plain sum of the adapters (exactly the sum when m >= R).
        router, top_k, temperature: for "route" (per-token gates over the K adapters, see
            lorafuse.routing): router "arrow" (default; prototypes from the adapters' weights, kept as
            the buffer router_weight (K, d_in)), "linear" (trainable router_weight (K, d_in) and
            router_bias (K,)) or "uniform" (averaging); top_k None (softmax over all K) or 1..K.
        num_adapters: for router "uniform", the size of the library the K adapters come from: gates
            1/num_adapters (default K). compose passes it where a layer carries some of the adapters.

    Public attributes: base_layer, a_cat (R, d_in), b_cat (d_out, R), scale (R,) (the effective
    per-column scale, s_i * w_i over adapter i's rank block), weights (K,), a_map, b_map (LoraMap),
    ranks (r_1..r_K), method.
    """

    def __init__(
        self,
        base: nn.Linear,
        adapters: Sequence[AdapterTriple],
        method: str = "sum",
        weights: Optional[Sequence[float]] = None,
        map_rank: Optional[int] = None,
        map_init: str = "lora",
        router: Optional[str] = None,
        top_k: Optional[int] = None,
        temperature: float = 1.0,
        num_adapters: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        d_out, d_in = base.weight.shape
        adapters = _check_adapters(adapters, d_in, d_out)
        K = len(adapters)
        if weights is not None and method != "weighted":
            raise ValueError(f"weights are only used with method='weighted', got method={method!r}")
        if method == "weighted":
            weights = [1.0 / K] * K if weights is None else check_weights(weights, K)
        else:
            weights = [1.0] * K
        if method == "loramap":
            if (map_rank is None or isinstance(map_rank, bool) or not isinstance(map_rank, numbers.Integral)
                    or map_rank < 1):
                raise ValueError(f"map_rank must be a positive integer for method='loramap', got {map_rank!r}")
            if map_init not in MAP_INITS:
                raise ValueError(f"map_init must be one of {MAP_INITS}, got {map_init!r}")
        elif map_rank is not None:
            raise ValueError(f"map_rank is only used with method='loramap', got method={method!r}")
        elif map_init != "lora":
            raise ValueError(f"map_init is only used with method='loramap', got method={method!r}")

        self.method = method
        self.base_layer = base  # frozen at the end, once every argument has been accepted
        self.ranks = [a.shape[0] for a, _, _ in adapters]
        dev, dt = base.weight.device, base.weight.dtype
        # Trainable low-rank factors are kept in float32 (as peft does); frozen ones in the base dtype.
        fdt = torch.float32 if method == "concat" else dt
        a_cat = torch.cat([a.detach().to(dev, fdt) for a, _, _ in adapters], 0)
        b_cat = torch.cat([b.detach().to(dev, fdt) for _, b, _ in adapters], 1)
        self.a_cat = nn.Parameter(a_cat, requires_grad=method == "concat")
        self.b_cat = nn.Parameter(b_cat, requires_grad=method == "concat")
        self.weights = nn.Parameter(torch.tensor(weights, dtype=torch.float32, device=dev),
                                    requires_grad=method == "weighted")
        self.register_buffer("adapter_scales", torch.tensor([s for _, _, s in adapters], dtype=torch.float32,
                                                            device=dev))
        self.register_buffer("rank_index", torch.repeat_interleave(
            torch.arange(K, device=dev), torch.tensor(self.ranks, device=dev)))
        self._scale_key = None
        self._scale_cache = None
        if method == "loramap":
            self.map_rank = int(map_rank)
            self.map_init = map_init
            a_map, b_map = self._init_map(int(map_rank), map_init)
            self.a_map = nn.Parameter(a_map)
            self.b_map = nn.Parameter(b_map)
        else:
            self.map_rank = None
            self.map_init = None
            self.a_map = None
            self.b_map = None
        if (method == "route" or router is not None or top_k is not None or temperature != 1.0
                or num_adapters is not None):
            from .routing import init_route
            init_route(self, router, top_k, temperature, num_adapters)
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def scale(self) -> Tensor:
        """(R,) float32: s_i * w_i repeated over adapter i's rank block."""
        w, s = self.weights, self.adapter_scales
        # Differentiable whenever a gradient can flow (weights or scales set to train, under any method).
        if (self.method == "weighted" or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and (w.requires_grad or s.requires_grad))):
            return (s * w)[self.rank_index]
        # The other methods fix the weights at 1: the (R,) vector is computed once and kept while the
        # scales and their storage stay the same (in-place edits bump _version), which saves two small
        # kernel launches per call, a large share of a decoding step. ("weighted" recomputes it on
        # every call: its weights are there to be set, and edits through `.data` bypass _version.)
        try:
            key = (w._version, s._version, w.data_ptr(), s.data_ptr(), self.rank_index.data_ptr())
        except RuntimeError:  # functorch-wrapped weights (vmap over functional_call) have no storage
            return (s * w)[self.rank_index]
        inference = torch.is_inference_mode_enabled()
        cache = self._scale_cache
        # An inference tensor cannot be saved for a backward outside inference mode: such a cache is
        # used only inside inference mode, and inference mode's result is not kept.
        if self._scale_key == key and cache is not None and (inference or not cache.is_inference()):
            return cache
        scale = (s * w)[self.rank_index].detach()
        if not inference:
            self._scale_cache, self._scale_key = scale, key
        return scale

    def refresh_scale(self) -> None:
        """Forget the cached (R,) scale; needed only after editing `adapter_scales` (or the weights of
        a method other than "weighted") through `.data`, which autograd's version counter does not see."""
        self._scale_key = self._scale_cache = None

    def _init_map(self, m: int, how: str) -> Tuple[Tensor, Tensor]:
        R = self.a_cat.shape[0]
        dev = self.a_cat.device
        if how == "lora":
            a_map = torch.empty((m, R), dtype=torch.float32, device=dev)
            nn.init.kaiming_uniform_(a_map, a=math.sqrt(5))
            return a_map, torch.zeros((R, m), dtype=torch.float32, device=dev)
        # "sum": M = b_map a_map (R x R) minimises || B diag(s) (M - I) A ||_F over rank m.
        if m >= R:
            eye = torch.eye(R, dtype=torch.float32, device=dev)
            pad = torch.zeros((m - R, R), dtype=torch.float32, device=dev)
            return torch.cat([eye, pad], 0), torch.cat([eye, pad], 0).t().contiguous()
        f64 = torch.float64
        bs = self.b_cat.detach().to(f64) * self.scale.detach().to(f64)
        _, rb = torch.linalg.qr(bs)                     # B diag(s) = Qb Rb
        _, ra = torch.linalg.qr(self.a_cat.detach().to(f64).t())  # A^T = Qa Ra
        u, sv, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)  # core of the summed delta
        # The summed delta has rank at most min(d_out, d_in, R) = len(sv): a larger m holds it exactly,
        # the map's extra rows and columns zero.
        k = min(m, sv.numel())
        root = sv[:k].sqrt()
        b_map = torch.zeros((R, m), dtype=f64, device=dev)
        a_map = torch.zeros((m, R), dtype=f64, device=dev)
        b_map[:, :k] = torch.linalg.pinv(rb) @ (u[:, :k] * root)
        a_map[:k] = (root[:, None] * vh[:k]) @ torch.linalg.pinv(ra.t())
        return a_map.to(torch.float32), b_map.to(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        w = self.base_layer.weight
        # The op would name its weight argument; here the caller chose x, not the layer's weight.
        if isinstance(x, Tensor) and (x.device != w.device or (
                x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type))):
            raise ValueError(f"x must be {w.dtype} on {w.device} like this layer, got {x.dtype} on {x.device} "
                             f"(cast the input, or the module with .to(...))")
        if self.method == "route":
            from .routing import lora_linear_routed
            return lora_linear_routed(x, w, self.base_layer.bias, self.a_cat, self.b_cat, self.scale, self.ranks,
                                      self.router_weight, self.router_kind, self.top_k, self.temperature,
                                      self.router_bias, num_adapters=self.num_adapters)
        return lora_linear(x, w, self.base_layer.bias, self.a_cat, self.b_cat, self.scale, self.a_map, self.b_map)

    @torch.no_grad()
    def lowrank_factors(self) -> Tuple[Tensor, Tensor]:
        """The composition as one plain LoRA with the scale folded into B: delta W = B' A'.

        sum / weighted / concat: A' = a_cat (R, d_in), B' = b_cat diag(scale) (d_out, R);
        loramap: A' = a_map a_cat (m, d_in), B' = b_cat diag(scale) b_map (d_out, m). float32 (float64
        for a float64 layer).
        """
        if self.method == "route":
            raise ValueError("a 'route' composition has no fixed low-rank factors or delta weight: its gates "
                             "depend on the input (merge and export need sum, weighted, concat or loramap)")
        acc = torch.float64 if self.a_cat.dtype == torch.float64 else torch.float32
        a = self.a_cat.detach().to(acc)
        b = self.b_cat.detach().to(acc) * self.scale.detach().to(acc)
        if self.a_map is not None:
            return self.a_map.detach().to(acc) @ a, b @ self.b_map.detach().to(acc)
        return a, b

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The dense (d_out, d_in) weight delta of the composition, float32 (float64 for a float64
        layer; for merging)."""
        a, b = self.lowrank_factors()
        return b @ a

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
             f"ranks={self.ranks}")
        if self.map_rank is not None:
            s += f", map_rank={self.map_rank}, map_init={self.map_init}"
        if self.method == "route":
            s += f", router={self.router_kind}, top_k={self.top_k}, temperature={self.temperature}"
            if self.num_adapters is not None:
                s += f", num_adapters={self.num_adapters}"
        return s
