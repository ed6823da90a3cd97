"""Run a script as a user would: in a subprocess, or as __main__ in this process (faster);
or build what it builds. Each test runs outside the checkout, in its own empty folder."""
import contextlib
import hashlib
import importlib
import io
import os
import pickle
import runpy
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from torchvision import datasets

import training

REPO = Path(__file__).resolve().parents[1]
# One thread a process: runs go side by side on CI's 2 cores, all with the same numerics.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# A run small enough for a 2-core CPU: synthetic data, random weights, small images.
TINY = ["--dummy", "--device", "cpu", "--no-pretrained", "--workers", "0",
        "--image-size", "32", "--batch-size", "4",
        "--limit-train-batches", "2", "--limit-eval-batches", "1"]
# The same on the `cifar` fixture's data set, in ./data.
SMALL = [arg for arg in TINY if arg != "--dummy"]
TRAIN_N, TEST_N = 12, 8  # the `cifar` fixture's images


def run_script(script, *args, cwd=None, env=None, timeout=300):
    """Run `python SCRIPT ARGS...` and return the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)


def run_here(script, *argv):
    """`python SCRIPT ARGV` as __main__ in this process, with no SIGTERM handler (pytest
    keeps its own): SimpleNamespace(returncode, stdout, stderr)."""
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    with (mock.patch.object(sys, "argv", [script, *map(str, argv)]),
          mock.patch.object(signal, "signal"), stops_heard_after(),
          contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr)):
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except SystemExit as exit_:
            status = exit_.code
    return SimpleNamespace(returncode=status, stdout=stdout.getvalue(),
                           stderr=stderr.getvalue())


def build(script, *argv):
    """What `python SCRIPT ARGV` would train, untrained, from the script's own build():
    SimpleNamespace(args, model, criterion, optimizer, train_data, test_data, script)."""
    module = importlib.import_module(Path(script).stem)
    args = training.parse_args(module.__file__, module.__doc__, epochs=module.EPOCHS,
                               batch_size=module.BATCH_SIZE, lr=module.LR,
                               image_size=module.IMAGE_SIZE, argv=[str(a) for a in argv])
    model, criterion, optimizer, train_data, test_data = module.build(args)
    return SimpleNamespace(args=args, model=model, criterion=criterion,
                           optimizer=optimizer, train_data=train_data,
                           test_data=test_data, script=module)


def train_for_real(built):
    """training.run on what build() returned, with the script's train() and validate()."""
    with stops_heard_after():
        training.run(built.args, built.model, built.criterion, built.optimizer,
                     built.train_data, built.test_data, train=built.script.train,
                     validate=built.script.validate)


@contextlib.contextmanager
def stops_heard_after():
    """A run ignores Ctrl-C and SIGTERM once it ends: here they are heard again after it,
    by pytest and by the processes it starts (which would inherit what it ignores)."""
    stops = (signal.SIGINT, signal.SIGTERM)
    handlers = {signum: signal.getsignal(signum) for signum in stops}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def one_error_line(proc, status):
    """Exit `status`, exactly one stderr line with "error:", no traceback; returns it."""
    assert proc.returncode == status, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="session", autouse=True)
def away_from_the_checkout(tmp_path_factory):
    """From the first fixture on, the working folder is not the checkout: there, a user's
    results/ and data/ (the README's smoke run) are never read, written, or in the way."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("away"))
        yield


@pytest.fixture(autouse=True)
def in_an_empty_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def mount(tmp_path):
    """mount(name, options): a tmpfs at ./name, mounted with `options` (e.g. "ro" or
    "size=8m"); the test is skipped where mounting is refused."""
    mounted = []

    def mount(name, options):
        folder = tmp_path / name
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """A tiny CIFAR-100 in ./data (the default --data-dir), as torchvision reads it and as
    a download (.archive) delivers it; torch on one thread, as ENV has subprocesses."""
    threads = torch.get_num_threads()
    # two threads on 2 busy cores mostly wait for each other
    torch.set_num_threads(1)
    yield write_cifar(tmp_path / "data", monkeypatch)
    torch.set_num_threads(threads)


def write_cifar(data, monkeypatch, same_image=False):
    """TRAIN_N and TEST_N random images (with `same_image`, one image over and over) and
    labels in CIFAR-100's on-disk format under `data`, with checksums CIFAR100 accepts."""
    rng, splits, files = np.random.default_rng(0), {}, {"meta": {"fine_label_names": [
        f"class{i}" for i in range(100)]}}
    for split, n in (("train", TRAIN_N), ("test", TEST_N)):
        pixels = rng.integers(0, 256, (1 if same_image else n, 3072), dtype=np.uint8)
        pixels, labels = np.repeat(pixels, n // len(pixels), 0), rng.integers(0, 100, n)
        images = pixels.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
        splits[split] = (images, labels.tolist())
        files[split] = {"data": pixels, "fine_labels": labels.tolist()}
    archive, folder = io.BytesIO(), data / "cifar-100-python"
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, content in files.items():
            (folder / name).write_bytes(pickle.dumps(content, protocol=2))
            tar.add(folder / name, f"cifar-100-python/{name}")
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in files}
    for attribute, value in {  # CIFAR100's checksums, of these files
            "train_list": [["train", md5["train"]]], "test_list": [["test", md5["test"]]],
            "meta": {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]},
            "tgz_md5": hashlib.md5(archive.getvalue()).hexdigest()}.items():
        monkeypatch.setattr(datasets.CIFAR100, attribute, value)
    return SimpleNamespace(folder=folder, archive=archive.getvalue(), **splits)
