from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="contrastive-lw",
    version="0.1.0",
    description="Layer-wise contrastive pretraining of convolutional networks, and transfer studies",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["contrastive_lw", "contrastive_lw.*"]),
    package_data={"contrastive_lw": ["accel/csrc/*.c"]},  # compiled on first use (contrastive_lw.accel.native)
    python_requires=">=3.10",
    install_requires=[
        # 2.5: fused AdamW on the CPU (2.4) and torch.OutOfMemoryError (2.5); tested with 2.14.1.
        "torch>=2.5",
        "torchvision>=0.20",
        "lightly>=1.5",
        "kornia>=0.7",
        "numpy",
        "pillow",
        "tensorboard",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "scikit-learn>=1.2",
    ],
    extras_require={"test": ["pytest>=7"], "search": ["faiss-cpu>=1.7"], "attack": ["torchattacks>=3.4"]},
    entry_points={"console_scripts": ["contrastive-lw=contrastive_lw.cli:main"]},
)
