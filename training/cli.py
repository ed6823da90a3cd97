"""The command line both scripts share, and the one place a run ends: every failure the user
can act on is a RunError, raised where it is found and printed here as one line."""
import argparse
import math
import os
import shlex
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000  # CIFAR-100's, and --dummy's
# Adam moves each weight by about lr a step: far beyond 1 a run only diverges.
MAX_LR = 1000.0
# EfficientNet-b0 cannot take less than 32 px, and BatchNorm in training cannot take a
# batch of one image under 64 px (its last feature map is then one value per channel).
MIN_IMAGE_SIZE, MIN_SINGLE_IMAGE_SIZE = 32, 64
MAX_IMAGE_SIZE = 2048  # twice the bug's: beyond it a step outgrows any GPU
MAX_WORKERS = 64
MAX_SEED = 2**63 - 1  # torch.manual_seed's limit
NAME_MAX = 255  # bytes in one file name, on the common file systems


class RunError(Exception):
    """A failure the user can act on: one line, no traceback. Exit status 1, or 2 where the
    command line asks for what cannot be done."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`): it stops a run exactly as Ctrl-C does."""


@contextmanager
def command_line(script_file, description, *, epochs, batch_size, lr, image_size):
    """Parse the script's command line, then run the block under the one top-level handler:
    a RunError or a stop signal ends the process with one line, anything unexpected with
    its traceback (which a bug report needs); both exit non-zero."""
    from .model import weights_problem  # (model.py imports RunError from here)

    args = parse_args(script_file, description, epochs=epochs, batch_size=batch_size, lr=lr,
                      image_size=image_size)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        problem = args.weights and weights_problem(args.weights)
        if problem:  # before the data set loads (or downloads): it is read first
            raise RunError(f"--weights {args.weights}: {problem}", status=2)
        yield args
        return
    except RunError as error:
        message, status = f"{args.prog}: error: {error}", error.status
    except KeyboardInterrupt as stop:
        name, status = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("SIGINT", 130)
        message = f"\n{name}: {stop.args[0] if stop.args else 'stopped'}"
    except Exception as error:
        traceback.print_exc()
        message, status = f"{args.prog}: error: unexpected {type(error).__name__}, above", 1
    print(message, file=sys.stderr)
    sys.exit(status)


def stop_on_sigterm(signum, frame):
    raise Terminated()


def resume_command():
    argv = [a for a in sys.argv if a != "--overwrite"]
    return "python " + shlex.join(argv + ([] if "--resume" in argv else ["--resume"]))


def parse_args(script_file, description, *, epochs, batch_size, lr, image_size, argv=None):
    """The command line shared by both scripts; the keyword arguments are the recipe's
    defaults. Every value that cannot work is refused here, before anything loads. Only
    checks: no file opened, no CUDA context, nothing installed."""
    script = Path(script_file).stem
    parser = argparse.ArgumentParser(
        prog=Path(script_file).name, description=description, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("recipe (the defaults are this script's)").add_argument
    group("--epochs", type=positive(int), default=epochs, metavar="N",
          help="epochs to train (default: %(default)s)")
    group("--batch-size", type=positive(int), default=batch_size, metavar="N",
          help="images per step, train and test (default: %(default)s)")
    group("--lr", type=positive(float), default=lr,
          help=f"Adam's learning rate, at most {MAX_LR:g} (default: %(default)s)")
    group("--image-size", type=positive(int), default=image_size, metavar="SIZE",
          help=f"images are resized to SIZE x SIZE, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
               "(default: %(default)s)")
    group("--seed", type=non_negative(int), default=0,
          help="decides the new head's initial weights (with --no-pretrained, all weights), "
               "shuffling, augmentation, dropout, and --dummy's images (default: 0)")
    group = parser.add_argument_group("data and weights").add_argument
    group("--data-dir", type=Path, default=Path("data"), metavar="DIR",
          help="where CIFAR-100 is, or is downloaded to (default: %(default)s)")
    group("--dummy", action="store_true",
          help="synthetic CIFAR-100-shaped data (50,000/10,000 32x32 images, 100 classes), for "
               "speed, memory and smoke tests: accuracy then says only whether the model learns")
    group("--weights", type=Path, metavar="PATH", help="a local copy of the published ImageNet "
          "weights (efficientnet-b0-355c32eb.pth), for machines without internet")
    group("--no-pretrained", action="store_true", help="random initial weights, not ImageNet's")
    group = parser.add_argument_group("running").add_argument
    group("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    group("--workers", type=non_negative(int), default=default_workers(), metavar="N",
          help=f"data loading processes, at most {MAX_WORKERS}; 0 loads in the main process "
               "(default: the CPUs available less one, at most 16: %(default)s here)")
    group("--fast", action="store_true",
          help="opt-in speed mode that changes numerics: bf16 autocast, channels_last, "
               "torch.compile with CUDA graphs, fused Adam, the data set augmented on the "
               "device. For bug.py it also changes the memory symptom (bf16 activations)")
    group("--limit-train-batches", type=positive(int), metavar="N",
          help="train on only N batches per epoch (a symptom check in minutes)")
    group("--limit-eval-batches", type=positive(int), metavar="N",
          help="evaluate on only N batches per epoch")
    group = parser.add_argument_group("results").add_argument
    group("--output-dir", type=Path, default=Path("results"), metavar="DIR",
          help="where results and checkpoints go (default: %(default)s)")
    group("--run-name", default=script, metavar="NAME",
          help="results go to DIR/NAME.json and DIR/NAME.pth (default: %(default)s)")
    group("--overwrite", action="store_true", help="replace an earlier run of the same name")
    group("--resume", action="store_true",
          help="continue the run DIR/NAME from its checkpoint, up to --epochs")
    args = parser.parse_args(argv)
    args.script, args.prog = script, parser.prog
    problem = refusal(args)
    if problem:
        parser.error(problem)
    args.pretrained = "none" if args.no_pretrained else "imagenet"
    # fused Adam is a CUDA kernel; None leaves PyTorch's own default, as in the report.
    args.fused = True if args.fast and args.device.type == "cuda" else None
    args.results_path = args.output_dir / f"{args.run_name}.json"
    args.checkpoint_path = args.output_dir / f"{args.run_name}.pth"
    problem = files_problem(args)
    if problem:
        parser.error(problem)
    return args


def refusal(args):
    """Why these arguments cannot make a run, or None."""
    if args.lr > MAX_LR:
        return f"--lr {args.lr:g}: must be at most {MAX_LR:g}"
    if not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        return (f"--image-size {args.image_size}: must be {MIN_IMAGE_SIZE} to "
                f"{MAX_IMAGE_SIZE} (EfficientNet-b0 cannot take less)")
    if args.batch_size > TRAIN_IMAGES:
        return f"--batch-size {args.batch_size}: more than the {TRAIN_IMAGES:,} training images"
    images = min(TRAIN_IMAGES, (args.limit_train_batches or TRAIN_IMAGES) * args.batch_size)
    if args.image_size < MIN_SINGLE_IMAGE_SIZE and 1 in (args.batch_size, images % args.batch_size):
        return (f"--batch-size {args.batch_size}: a training batch of one image cannot pass "
                f"BatchNorm at {args.image_size} px; use another --batch-size, or "
                f"--image-size {MIN_SINGLE_IMAGE_SIZE} or more")
    if args.workers > MAX_WORKERS:
        return f"--workers {args.workers}: must be at most {MAX_WORKERS}"
    if args.seed > MAX_SEED:
        return f"--seed {args.seed}: must be below 2**63"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return f"--device {args.device}: unknown device; use cuda, cuda:N or cpu"
    if device.type not in ("cuda", "cpu"):
        return f"--device {args.device}: unsupported; use cuda, cuda:N or cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return ("CUDA is not available on this machine: run with --device cpu (slow; add "
                    "--dummy --no-pretrained --limit-train-batches N for a quick check)")
        if device.index is None:
            device = torch.device("cuda", 0)
        if device.index >= torch.cuda.device_count():
            return (f"--device {args.device}: this machine has {torch.cuda.device_count()} "
                    "CUDA device(s)")
    args.device = device
    if args.weights is not None:
        if args.no_pretrained:
            return "--weights and --no-pretrained contradict each other"
        if not args.weights.exists():
            return f"--weights {args.weights}: no such file"
        if args.weights.is_dir():
            return f"--weights {args.weights}: is a directory, not a weights file"
    if not args.run_name or os.sep in args.run_name or args.run_name.startswith("."):
        return f"--run-name {args.run_name!r}: must be a plain file name"
    if len(f".{args.run_name}.json.tmp".encode()) > NAME_MAX:
        return f"--run-name: too long for a file name (at most {NAME_MAX - 10} bytes)"
    for flag, folder, access in (("--data-dir", args.data_dir, os.R_OK),
                                 ("--output-dir", args.output_dir, os.W_OK)):
        problem = folder_problem(folder, access)
        if problem:
            return f"{flag} {folder}: {problem}"
    if args.resume and args.overwrite:
        return "--resume continues a run and --overwrite replaces it: pick one"
    return None


def folder_problem(folder, access):
    """Why this process cannot use `folder` (read it, or write it: `access`), or create it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if existing == folder and not os.access(folder, access | os.X_OK):
        return f"cannot be {'read' if access == os.R_OK else 'written'} (permission denied)"
    if existing != folder and not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be created in {existing} (permission denied)"
    if existing != folder and hasattr(os, "statvfs"):  # POSIX
        system = os.statvfs(existing)
        if system.f_flag & os.ST_RDONLY:
            return f"cannot be created in {existing} (a read-only file system)"
        if system.f_blocks == 0:  # /proc, /sys: file systems that hold no files of ours
            return f"cannot be created in {existing} (not a file system for data)"
    return None


def files_problem(args):
    """Why this run may not write its files as they are now, or None. Checked here, and
    again under the run's lock, before its first write."""
    if args.resume and not args.checkpoint_path.exists():
        if args.results_path.exists():
            return (f"--resume: {args.results_path} has no checkpoint beside it to resume "
                    "from: --overwrite starts the run afresh")
        return f"--resume: no run {args.checkpoint_path} to resume: leave out --resume"
    existing = [p for p in (args.results_path, args.checkpoint_path) if p.exists()]
    if existing and not (args.resume or args.overwrite):
        return (f"{existing[0]} holds an earlier run: pass --resume to continue it, "
                "--overwrite to replace it, or --run-name to keep both")
    return None


def positive(kind):
    return bounded(kind, lambda value: value > 0 and math.isfinite(value), "a positive number")


def non_negative(kind):
    return bounded(kind, lambda value: value >= 0, "0 or more")


def bounded(kind, ok, what):
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def default_workers():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(16, (cpus or 1) - 1))
