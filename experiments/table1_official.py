"""Runs the official PTB code of Fu et al. (2019) on a CPU with today's PyTorch, for reference.

    pip install torch h5py python-dateutil          # not vae_jax dependencies
    git clone https://github.com/haofuml/cyclical_annealing     # its language_model/ folder
    python experiments/table1_official.py prepare --code_dir cyclical_annealing/language_model \
        --work_dir /tmp/official                    # Kim et al.'s preprocess_text.py
    python experiments/table1_official.py train --code_dir cyclical_annealing/language_model \
        --work_dir /tmp/official --schedule monotonic -- --seed 1 --num_epochs 2 \
        > /tmp/official/monotonic.seed-1.log
    python experiments/table1_fidelity.py \
        --official 'monotonic=/tmp/official/monotonic.seed-*.log' ...

``prepare`` runs the code's ``preprocess_text.py`` on ``$VAE_JAX_DATA_DIR/ptb`` (Mikolov's
files, identical to the code's own ``data/ptb``), writing ``ptb-{train,val,test}.hdf5``;
``train`` runs ``train_text_bl_ptb.py`` (``--schedule monotonic``: β from 0.1 up by 1/10 per
epoch) or ``train_text_cyc_ptb.py`` (``cyclical``) with the arguments after ``--``, logging to
stdout. The code is Python 3.6 / PyTorch 0.2 and CUDA only; the scripts are run unchanged except
for these substitutions, made in memory (the checkout is not modified): ``x.data[0]`` →
``x.item()``, ``clip_grad_norm`` → ``clip_grad_norm_``, ``nn.LogSoftmax()`` → ``dim=-1`` (the
old implicit dimension for 2-D input), ``torch.cuda.FloatTensor(s).normal_(0, 1)`` →
``torch.randn(s)``, and ``.cuda()`` / ``cuda.set_device`` become no-ops. ``--threads`` sets
PyTorch's intra-op threads (1 lets two runs share two cores).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
from pathlib import Path

SCRIPTS = {"monotonic": "train_text_bl_ptb.py", "cyclical": "train_text_cyc_ptb.py"}
MODULES = ("data", "logger", "models_text", "optim_n2n", "utils")
SUBSTITUTIONS = (
    (re.compile(r"\.data\[0\]"), ".item()"),
    (re.compile(r"clip_grad_norm\("), "clip_grad_norm_("),
    (re.compile(r"nn\.LogSoftmax\(\)"), "nn.LogSoftmax(dim=-1)"),
    (re.compile(r"torch\.cuda\.FloatTensor\(([^()]*(?:\([^()]*\))?)\)\.normal_\(0, 1\)"),
     r"torch.randn(\1)"),
)  # fmt: skip


def patched_source(path: Path) -> str:
    text = path.read_text()
    for pattern, replacement in SUBSTITUTIONS:
        text = pattern.sub(replacement, text)
    return text


def load_module(code_dir: Path, name: str) -> None:
    """Imports the code's module ``name`` from its patched source, under its own name."""
    path = code_dir / f"{name}.py"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(patched_source(path), str(path), "exec"), module.__dict__)


def run_script(code_dir: Path, script: str, argv: list[str]) -> None:
    path = code_dir / script
    sys.argv = [str(path), *argv]
    exec(compile(patched_source(path), str(path), "exec"), {"__name__": "__main__"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("prepare", "train"))
    parser.add_argument("--code_dir", required=True, help="the official language_model/ folder")
    parser.add_argument("--work_dir", required=True, help="hdf5 files, checkpoints, logs")
    parser.add_argument("--schedule", choices=tuple(SCRIPTS), default="monotonic")
    parser.add_argument("--name", default="", help="logs/<name>, models/<name>; default: schedule")
    parser.add_argument("--threads", type=int, default=1)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, rest = parser.parse_args(argv[:split]), argv[split + 1 :]  # after --: the script's
    code_dir = Path(args.code_dir).resolve()
    work = Path(args.work_dir).resolve()
    missing = [s for s in (*SCRIPTS.values(), "preprocess_text.py") if not (code_dir / s).exists()]
    if missing:
        raise SystemExit(f"--code_dir={code_dir}: not the official language_model/ ({missing})")
    data = work / "data"
    if args.mode == "prepare":
        ptb = Path(os.environ.get("VAE_JAX_DATA_DIR", "")) / "ptb"
        if not (ptb / "ptb.train.txt").exists():
            raise SystemExit(f"{ptb}/ptb.train.txt not found: set $VAE_JAX_DATA_DIR.")
        data.mkdir(parents=True, exist_ok=True)
        run_script(code_dir, "preprocess_text.py", [
            "--trainfile", str(ptb / "ptb.train.txt"), "--valfile", str(ptb / "ptb.valid.txt"),
            "--testfile", str(ptb / "ptb.test.txt"), "--outputfile", str(data / "ptb"), *rest,
        ])  # fmt: skip
        return
    if not (data / "ptb-train.hdf5").exists():
        raise SystemExit(f"{data}/ptb-train.hdf5 not found: run `prepare` first.")
    name = args.name or args.schedule
    import torch  # only here: `prepare` needs no PyTorch

    torch.set_num_threads(args.threads)
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    sys.path.insert(0, str(code_dir))
    for name in MODULES:
        load_module(code_dir, name)
    run_script(code_dir, SCRIPTS[args.schedule], [
        "--model", "vae", "--slurm", "1",
        "--train_file", str(data / "ptb-train.hdf5"), "--val_file", str(data / "ptb-val.hdf5"),
        "--test_file", str(data / "ptb-test.hdf5"),
        "--checkpoint_dir", str(work / "models" / name), "--log_dir", str(work / "logs" / name),
        *rest,
    ])  # fmt: skip


if __name__ == "__main__":
    main()
