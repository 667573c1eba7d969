"""Triton kernels of lorafuse (installed as lorafuse.kernels).

shrink / shrink_backward: x -> S' = ((x a_cat^T) [a_map^T b_map^T]) * scale, and its backward.
lora_gemm: out = a @ b + s @ c + bias, the expand run as extra K-steps of the base GEMM.
lora_gemm_fused: the whole layer in one launch (few tokens).
lora_gemm_persistent: the whole layer in one persistent launch, the shrink as its first phase (Hopper, many
  tokens; opt-in).

Run from the repository's root (`python -m pytest`, `python -c`, a notebook), this folder also lies on
the path as a top-level `kernels`, a name that belongs to another package (Hugging Face's `kernels`,
which transformers imports). Imported under that name it hands the name over to that package where it
is installed, and otherwise stands in as an empty module without a file, so that no second copy of
lorafuse's kernels loads under a name that is not theirs (transformers 5.17 probes the name by
importing it, and imports fine with the stand-in).
"""
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _other = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _other is not None:
        _module = _util.module_from_spec(_other)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this runs
        _other.loader.exec_module(_module)
    else:
        # a spec without a file: find_spec("kernels") keeps working once the name is imported
        _stub = _util.module_from_spec(_machinery.ModuleSpec("kernels", None))
        _stub.__doc__ = "Not lorafuse's kernels (import those as lorafuse.kernels); no package 'kernels' is installed."
        _sys.modules["kernels"] = _stub
else:
    from .lora_gemm import lora_gemm, lora_gemm_fused, lora_gemm_persistent
    from .shrink import shrink, shrink_backward
    from .utils import can_run, is_interpreting

    __all__ = ["shrink", "shrink_backward", "lora_gemm", "lora_gemm_fused", "lora_gemm_persistent", "can_run",
               "is_interpreting"]
