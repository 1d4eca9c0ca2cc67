"""vae_jax: text VAEs without KL vanishing, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vae_jax",
    version="0.1.0",
    description=(
        "Cyclical annealing (Fu et al., NAACL 2019) and other KL-vanishing remedies for "
        "text VAEs, in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vae_jax", "vae_jax.*", "configs", "configs.*"]),
    python_requires=">=3.11",
    install_requires=[
        # No upper bound: GPU images ship a newer jax (0.11 on Python 3.12) that must be
        # accepted as it is.
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "ml-collections",
        "absl-py",
        "tensorflow-datasets",
        # tensorflow-datasets imports it without declaring it.
        "importlib_resources",
        "array-record",
        "numpy",
        "matplotlib",
        # TensorBoard event files without a TensorFlow dependency.
        "tensorboardX",
        "tqdm",
        "orbax-checkpoint",
        # BLEU of sampled dialog responses (the official dialog code's sentence BLEU).
        "nltk",
    ],
    extras_require={
        # nbclient, nbformat, ipykernel: the quickstart notebook runs in the test suite.
        "test": ["pytest", "hypothesis", "ruff", "nbclient", "nbformat", "ipykernel"],
        # Accelerators: jax's own extras pull the matching jaxlib plugin (CUDA 12 wheels, or
        # libtpu). Same lower bound as above, still no upper one.
        "gpu": ["jax[cuda12]>=0.10"],
        "tpu": ["jax[tpu]>=0.10"],
    },
)
