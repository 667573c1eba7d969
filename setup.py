from setuptools import setup

# The Triton kernels live in ./kernels but are installed as lorafuse.kernels: a top-level
# `kernels` module would clash with another popular package of that name.
setup(
    name="lorafuse",
    version="0.1.0",
    description="Fused Triton kernels for multi-LoRA composition (sum, weighted, concat, LoraMap, routing)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lorafuse", "lorafuse.experiments", "lorafuse.kernels"],
    package_dir={"lorafuse": "lorafuse", "lorafuse.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.3",
        "numpy",
        "safetensors",
        "transformers>=4.56",
        "peft>=0.17",
    ],
    extras_require={
        # The training path (datasets, Trainer's accelerate, sklearn metrics, plots) is tested in CI.
        "test": ["pytest", "nevergrad>=1.0", "datasets>=2.16", "accelerate>=1.1", "scikit-learn",
                 "matplotlib"],
        "lorahub": ["nevergrad>=1.0"],
        # `lorafuse demo` and the studies; SmolLM2's GGUF file is read with the gguf package.
        "experiments": ["nevergrad>=1.0", "datasets>=2.16", "accelerate>=1.1", "scikit-learn",
                        "matplotlib", "gguf"],
    },
    entry_points={"console_scripts": ["lorafuse=lorafuse.cli:main"]},
)
