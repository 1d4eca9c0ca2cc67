"""Shared test helpers: where the reference fixtures and corpora live, the configs as modules,
a tiny synthetic config, and running a command of this repository in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository with `shared/` beside it.
SHARED = Path(os.environ.get("VAE_JAX_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"

# Many tests compile the same small train and eval steps (in this process and in
# subprocesses): JAX's persistent compilation cache lets them compile once per suite run.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "vae_jax_jit_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# configs/*.py, experiments/*.py and benchmarks/*.py as importable modules (`import synthetic`,
# `import table1_ptb`, `import benchmark`), as each script imports its siblings.
for folder in ("configs", "experiments", "benchmarks"):
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

import synthetic  # noqa: E402  (configs/synthetic.py)


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is absent (set VAE_JAX_SHARED_DIR to shared/)")
    return path


def tiny_synthetic_config(variant="cyclical", steps=30, *, log_every=10, eval_every=None, **top):
    """``configs/synthetic.py:<variant>`` shrunk to a few ms a step: 10 sequences of 4 words
    from 8, embeddings 4, LSTMs 8, batches of 8 (eval 4), ``steps`` steps; evaluation every
    ``eval_every`` steps (default: at the end); ``top`` sets top-level fields."""
    config = synthetic.get_config(variant)
    config.update(num_train_steps=steps, log_every_steps=log_every)
    config.update(eval_every_steps=eval_every or steps, batch_size=8, eval_batch_size=4)
    config.data.update(vocab_size=12, length=4)
    config.model.update(enc_emb_dim=4, enc_hidden_dim=8, dec_emb_dim=4, dec_hidden_dim=8)
    config.update(top)
    return config


def run_python(args, *, timeout=300, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    """``python args…`` in the repository (or ``cwd``), output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops JAX's in-memory executables after each test module: every one keeps its machine
    code mapped, and one process holding the whole suite's ran into the kernel's limit on
    memory mappings (vm.max_map_count, 65,530 here) and aborted."""
    yield
    import jax  # here: the cache settings above must come before jax is imported

    jax.clear_caches()
