"""Run a script as a user would (a subprocess), or build what it builds, in-process."""
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import training

REPO = Path(__file__).resolve().parents[1]
# One thread a process: runs go side by side on CI's 2 cores, all with the same numerics.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# A run small enough for a 2-core CPU: synthetic data, random weights, small images.
TINY = ["--dummy", "--device", "cpu", "--no-pretrained", "--workers", "0", "--image-size", "32",
        "--batch-size", "4", "--limit-train-batches", "2", "--limit-eval-batches", "1"]


def run_script(script, *args, cwd=None, env=None, timeout=300):
    """Run `python SCRIPT ARGS...` and return the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)


def build(script, *argv):
    """What `python SCRIPT ARGV` would train, untrained, from the script's own build():
    SimpleNamespace(args, model, criterion, optimizer, train_data, test_data)."""
    module = importlib.import_module(Path(script).stem)
    args = training.parse_args(module.__file__, module.__doc__, epochs=module.EPOCHS,
                               batch_size=module.BATCH_SIZE, lr=module.LR,
                               image_size=module.IMAGE_SIZE, argv=[str(a) for a in argv])
    model, criterion, optimizer, train_data, test_data = module.build(args)
    return SimpleNamespace(args=args, model=model, criterion=criterion, optimizer=optimizer,
                           train_data=train_data, test_data=test_data)


def one_error_line(proc, status):
    """Exit `status`, exactly one stderr line holding "error:", no traceback; returns it."""
    assert proc.returncode == status, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(autouse=True)
def in_an_empty_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so that the default results/ and data/ are
    never those of the checkout."""
    monkeypatch.chdir(tmp_path)
