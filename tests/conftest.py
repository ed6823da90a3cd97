"""Shared test helpers: run a script as a user would (a subprocess), or build what a script
builds (its args, model, optimizer, data) in-process, without training."""
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import training

REPO = Path(__file__).resolve().parents[1]

# A run small enough for a 2-core CPU: synthetic data, random weights, tiny images.
TINY = ["--dummy", "--device", "cpu", "--no-pretrained", "--workers", "0",
        "--image-size", "32", "--batch-size", "4",
        "--limit-train-batches", "2", "--limit-eval-batches", "1"]


def run_script(script, *args, cwd=None, env=None, timeout=600):
    """Run `python SCRIPT ARGS...` from the repo and return the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def build(monkeypatch):
    """build("bug.py", *argv) runs the script up to training.run() and returns what it
    would have trained: args, model, criterion, optimizer, train_set, test_set."""
    def build(script, *argv):
        captured = {}

        def capture(args, model, criterion, optimizer, train_set, test_set):
            captured.update(args=args, model=model, criterion=criterion, optimizer=optimizer,
                            train_set=train_set, test_set=test_set)

        monkeypatch.setattr(training, "run", capture)
        monkeypatch.setattr(sys, "argv", [str(REPO / script), *map(str, argv)])
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        finally:  # parse_args installs the scripts' own handlers: give pytest its own back
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return SimpleNamespace(**captured)
    return build
