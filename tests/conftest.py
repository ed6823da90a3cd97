"""Shared test helpers: run a script as a user would (a subprocess), or build what a script
builds (its args, model, optimizer, data) in-process, without training."""
import subprocess
import sys
from pathlib import Path

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


HOLD_LOCK = """import fcntl, os, sys, time
lock = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(lock, fcntl.LOCK_EX)
os.pwrite(lock, b"%d\\n" % os.getpid(), 0)
print("held", flush=True)
time.sleep(600)
"""


def hold_run_lock(path):
    """A stand-in for a run going on: a process holding the run's lock file `path` as
    training.take_run_lock does. Kill it to end the "run"."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.fixture(autouse=True)
def in_an_empty_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so that the default results/ and data/ are
    never those of the checkout: a user's own runs there are neither refused over nor
    touched."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def build():
    """build("bug.py", *argv): what the script would train (training.build)."""
    return lambda script, *argv: training.build(REPO / script, argv)
