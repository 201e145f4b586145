"""gpam_fairseq: generalized probabilistic attention (daGPAM) as a fairseq plugin."""

from setuptools import find_packages, setup

setup(
    name="gpam_fairseq",
    version="0.1.0",
    description="daGPAM attention (Heo & Choi, arXiv:2410.15578) for fairseq: "
    "transformer_gpam NMT and transformer_lm_gpam LM architectures",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["gpam_fairseq", "gpam_fairseq.*"]),
    install_requires=[
        # A range, not a pin: an installed torch (CPU or CUDA build) satisfies it and is
        # reused; `make` installs torch==2.13.0 first where none is present.
        "torch>=2.0",
        # fairseq's main branch packaged for Python >= 3.11 (0.12.2 cannot install with
        # pip >= 24.1 nor import on 3.11); it provides the `fairseq` module.
        "fairseq-fixed==0.12.3.1",
        "sacremoses",  # Moses tokenisation for the recipes, without Perl
        "subword-nmt",  # BPE for the recipes, without a git clone
        "sacrebleu>=2.0",  # BLEU and chrF with signatures
        "tensorboard",  # fairseq's --tensorboard-logdir
        "matplotlib",  # PNG figures of the comparison, analysis and benchmark scripts
        "scipy",  # compare_runs.py's paired t-test over seeds (already installed with fairseq's scikit-learn)
        "tqdm",  # the recipes' download progress (already installed with fairseq)
    ],
    extras_require={
        # fairscale: fairseq's --ddp-backend fully_sharded, whose GPU test and CPU error
        # message are tested (pure Python; fairseq imports it only where it is installed).
        # submitit: scripts/sweep.py --slurm (a SLURM job array), tested through its local
        # executor; only the sweeps and the tests need it (pure Python).
        # pytest-xdist: make test runs one worker per core
        "test": ["pytest>=7", "pytest-xdist>=3", "fairscale>=0.4.0", "submitit>=1.5"],
        "slurm": ["submitit>=1.5"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
