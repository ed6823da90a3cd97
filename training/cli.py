"""The command line both scripts share, and the one place a run ends: every failure the
user can act on is a RunError, raised where it is found and printed here as one line."""
import argparse
import math
import os
import re
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from .data import DEFAULT_WORKERS, TRAIN_IMAGES
from .errors import STOPS, RunError, Terminated, ignore_stops
from .model import weights_problem
from .rundir import files_problem

MIN_IMAGE_SIZE = 32  # EfficientNet-b0's last feature map is then 1x1
MAX_IMAGE_SIZE = 2048  # twice the bug's: beyond it a step outgrows any GPU
MAX_WORKERS = 64
# The README's smoke run: synthetic data, random weights, 32 px, one batch of each kind.
SMOKE_RUN = ("--dummy --no-pretrained --device cpu --epochs 1 --image-size 32 "
             "--limit-train-batches 1 --limit-eval-batches 1 --output-dir results/smoke")


@contextmanager
def command_line(script_file, description, **recipe):
    """Parse, then run the block under the one handler: a RunError or a stop ends in one
    line, anything unexpected with its traceback."""
    args = parse_args(script_file, description, **recipe)

    def stop(signum, frame):  # Ctrl-C, or a scheduler's or `kill`'s SIGTERM
        ignore_stops()  # a second stop would only break the first one's clean-up
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    for signum in STOPS:
        signal.signal(signum, stop)
    try:
        problem = args.weights and weights_problem(args.weights)
        if problem:  # before the data set loads (or downloads): it is read first
            raise RunError(f"--weights {args.weights}: {problem}", status=2)
        yield args
        return
    except (KeyboardInterrupt, Exception) as error:
        ignore_stops()  # the outcome is known: a second stop must not break the clean-up
        if isinstance(error, KeyboardInterrupt):
            name = "SIGTERM" if isinstance(error, Terminated) else "SIGINT"
            message = f"\n{name}: {error.args[0] if error.args else 'stopped'}"
            status = 128 + getattr(signal, name)
        elif isinstance(error, RunError):
            message, status = f"{args.prog}: error: {error}", error.status
        else:  # unexpected: its traceback first, which a bug report needs
            traceback.print_exc()
            name = type(error).__name__
            message, status = f"{args.prog}: error: unexpected {name}, above", 1
    print(message, file=sys.stderr)
    sys.exit(status)


def parse_args(script_file, description, *, epochs, batch_size, lr, image_size,
               argv=None):
    """The keyword arguments are the recipe's defaults. Every value that cannot work is
    refused here, before anything loads or starts."""
    script = Path(script_file).stem
    parser = argparse.ArgumentParser(
        prog=Path(script_file).name, description=description, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("recipe (defaults: this script's)").add_argument
    group("--epochs", type=number(int), default=epochs, metavar="N",
          help="epochs to train (default: %(default)s)")
    group("--batch-size", type=number(int), default=batch_size, metavar="N",
          help="images per step, train and test (default: %(default)s)")
    group("--lr", type=number(float), default=lr,
          help="Adam's learning rate, at most 1000 (default: %(default)s)")
    group("--image-size", type=number(int), default=image_size, metavar="SIZE",
          help=f"images resized to SIZE x SIZE, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
               "(default: %(default)s)")
    group("--seed", type=number(int, zero=True), default=0,
          help="draws the new head (with --no-pretrained, all weights), the order, "
               "augmentation, dropout and --dummy's images (default: 0)")
    group = parser.add_argument_group("data and weights").add_argument
    group("--data-dir", type=Path, default=Path("data"), metavar="DIR",
          help="where CIFAR-100 is, or is downloaded to (default: %(default)s)")
    group("--dummy", action="store_true", help="synthetic CIFAR-100-shaped data: its "
          "accuracy says only whether the model learns")
    group("--weights", type=Path, metavar="PATH", help="a copy of the ImageNet weights "
          "(efficientnet-b0-355c32eb.pth), for machines without internet")
    group("--no-pretrained", action="store_true", help="random weights, not ImageNet's")
    group = parser.add_argument_group("running").add_argument
    group("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    group("--workers", type=number(int, zero=True), default=DEFAULT_WORKERS, metavar="N",
          help=f"loader processes, at most {MAX_WORKERS}; 0: the main process loads "
               "(default: the CPUs less one, at most 16: %(default)s here)")
    group("--fast", action="store_true",
          help="opt-in speed mode that changes numerics: bf16 autocast, channels_last, "
               "torch.compile with CUDA graphs, data augmented on the device. An epoch "
               "leaves out its last partial training batch (16 of 50,000 images at "
               "batch 64); the last test batch is padded, and only its real images "
               "counted. For bug.py it also hides part of the memory symptom")
    group("--limit-train-batches", type=number(int), metavar="N",
          help="train on only N batches per epoch (a symptom check in minutes)")
    group("--limit-eval-batches", type=number(int), metavar="N",
          help="evaluate on only N batches per epoch")
    group = parser.add_argument_group("results").add_argument
    group("--output-dir", type=Path, default=Path("results"), metavar="DIR",
          help="where results and checkpoints go (default: %(default)s)")
    group("--run-name", default=script, metavar="NAME",
          help="results go to DIR/NAME.json and DIR/NAME.pth (default: %(default)s)")
    group("--overwrite", action="store_true", help="replace an earlier run of this name")
    group("--resume", action="store_true",
          help="continue the run DIR/NAME from its checkpoint, up to --epochs")
    args = parser.parse_args(argv)
    args.script, args.prog = script, parser.prog
    args.results_path = args.output_dir / f"{args.run_name}.json"
    args.checkpoint_path = args.output_dir / f"{args.run_name}.pth"
    problem = refusal(args) or files_problem(args)
    if problem:
        parser.error(problem)
    args.pretrained = "none" if args.no_pretrained else "imagenet"
    return args


def refusal(args):
    """Why these arguments cannot make a run, or None."""
    if args.lr > 1000:  # Adam moves a weight by about lr a step: beyond ~1e37, overflow
        return f"--lr {args.lr:g}: must be at most 1000"
    if not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        return (f"--image-size {args.image_size}: must be {MIN_IMAGE_SIZE} to "
                f"{MAX_IMAGE_SIZE} (EfficientNet-b0 cannot take less)")
    if args.batch_size > TRAIN_IMAGES:
        return f"--batch-size {args.batch_size}: more than the {TRAIN_IMAGES:,} images"
    if args.workers > MAX_WORKERS:
        return f"--workers {args.workers}: must be at most {MAX_WORKERS}"
    if args.seed >= 2**63:  # torch.manual_seed's limit
        return f"--seed {args.seed}: must be below 2**63"
    if not re.fullmatch(r"cpu|cuda(:(0|[1-9][0-9]{0,3}))?", args.device):
        return f"--device {args.device}: use cuda, cuda:N or cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return ("CUDA is not available on this machine: add --device cpu (slow). A "
                    f"smoke run in under a minute: python {args.prog} {SMOKE_RUN}")
        device = torch.device("cuda", device.index or 0)
        if device.index >= torch.cuda.device_count():
            return (f"--device {args.device}: this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s)")
    args.device = device
    if args.weights and args.no_pretrained:
        return "--weights and --no-pretrained contradict each other"
    name = args.run_name
    if not name.isprintable() or not name or os.sep in name or name.startswith("."):
        return f"--run-name {name!r}: must be a plain file name"
    folders = [("--output-dir", args.output_dir, os.W_OK)]
    if not args.dummy:  # --dummy reads no data set
        folders.append(("--data-dir", args.data_dir, os.R_OK))
    for flag, folder, access in folders:
        problem = folder_problem(folder, access)
        if problem:
            return f"{flag} {folder}: {problem}"
    if args.resume and args.overwrite:
        return "--resume continues a run and --overwrite replaces it: pick one"
    return None


def folder_problem(folder, access):
    """Why this process cannot use `folder` (`access`: read or write it), or create it."""
    existing = folder
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except PermissionError:  # (a folder on the way that this user cannot search)
        return "cannot be reached (permission denied on a folder above it)"
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    system = os.statvfs(existing) if hasattr(os, "statvfs") else None  # POSIX
    read_only = system and system.f_flag & os.ST_RDONLY
    if existing == folder:
        if access == os.W_OK and read_only:
            return "cannot be written (a read-only file system)"
        if not os.access(folder, access | os.X_OK):
            use = "read" if access == os.R_OK else "written"
            return f"cannot be {use} (permission denied)"
        return None
    if read_only or system and system.f_blocks == 0:  # /proc, /sys
        return f"cannot be created in {existing} (a read-only or special file system)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be created in {existing} (permission denied)"
    return None


def number(kind, zero=False):
    """argparse's type for a finite `kind` above 0 (from 0, with `zero`)."""
    def parse(text):
        value = kind(text)
        # (nan > 0 is False)
        if not (value >= 0 if zero else value > 0) or value == math.inf:
            raise argparse.ArgumentTypeError(
                f"must be {'0 or more' if zero else 'a positive number'}, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse
