"""lorafuse: fused Triton kernels for composing several LoRA adapters on one linear layer.

    y = lorafuse.lora_linear(x, weight, bias, a_cat, b_cat, scale, a_map=None, b_map=None)
    layer = lorafuse.MultiLoraLinear(nn.Linear(...), [(A1, B1, s1), (A2, B2, s2)], method="loramap", map_rank=16)
"""
from .modules import MultiLoraLinear
from .ops import lora_linear, use_backend
from .reference import lora_linear_reference

__version__ = "0.1.0"

__all__ = ["lora_linear", "lora_linear_reference", "MultiLoraLinear", "use_backend", "__version__"]

from .adapters import LoraAdapter, load_adapter, load_adapters  # noqa: E402
from .compose import compose, decompose, get_composition, merge, unmerge  # noqa: E402
from .export import export_peft  # noqa: E402
from . import analysis  # noqa: E402
from .merging import merge_adapters  # noqa: E402
from .lorahub import lorahub_search, lorahub_train  # noqa: E402

__all__ += ["LoraAdapter", "load_adapter", "load_adapters", "compose", "decompose", "get_composition", "merge",
            "unmerge", "export_peft", "analysis", "merge_adapters",
            "lorahub_search", "lorahub_train"]
from .segmented import LoraLibrary, lora_linear_segmented  # noqa: E402,F401
__all__ += ["LoraLibrary", "lora_linear_segmented"]
from .routing import arrow_prototypes, lora_linear_routed, lora_linear_routed_reference  # noqa: E402
__all__ += ["arrow_prototypes", "lora_linear_routed", "lora_linear_routed_reference"]
