"""What bug.py and fixed.py share: the command line, CIFAR-100, the model's weights, the
training loop, evaluation, and the per-epoch results and checkpoints.

The two scripts hold only what differs between the bug and the fix, so that
`diff bug.py fixed.py` shows the four fixes and nothing else. Nothing here changes what
the scripts ask for: the transforms, the freezing, the optimizer and the hyper-parameters
are theirs, used as given.
"""
import argparse
import collections
import errno
import importlib.util
import json
import math
import os
import random
import runpy
import shlex
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import url_map as efficientnet_url_map
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks, and a run's files are not guarded
    fcntl = None

NUM_CLASSES = 100
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
CIFAR_ARCHIVE = datasets.CIFAR100.filename  # cifar-100-python.tar.gz
CIFAR_URL = datasets.CIFAR100.url
WEIGHTS_URL = efficientnet_url_map["efficientnet-b0"]
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]  # efficientnet-b0-355c32eb.pth
# Settings a checkpoint must share with the run that resumes it: anything else would
# splice two different experiments into one history.
RECIPE_KEYS = ("script", "image_size", "batch_size", "lr", "optimizer", "pretrained", "dummy",
               "fast", "seed", "limit_train_batches", "limit_eval_batches")
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Adam moves each weight by about lr a step: far beyond 1 a run only diverges (a one-line
# NaN error), and from about 3e37 Adam's own step overflows float32 (a traceback).
MAX_LR = 1000.0
# --fast on CUDA: torch.compile with CUDA graphs (reduce-overhead), which removes the eager
# step's kernel-launch overhead; static shapes: one graph per batch shape and mode.
COMPILE = dict(mode="reduce-overhead", dynamic=False)
COMPILE_ON = ("cuda",)  # CUDA graphs need CUDA
# With --fast, the first calls per batch shape and mode: compiling and a warm-up run, then
# capturing the CUDA graph (cudagraph trees record on a function's second call); replays follow.
COMPILED_WARMUP_CALLS = 2


# --------------------------------------------------------------------------- command line

def parse_args(script_file, description, *, epochs, batch_size, lr, image_size, argv=None):
    """The command line shared by both scripts; the keyword arguments are the recipe's
    defaults. Every bad value is refused here, before anything is loaded or written."""
    script = Path(script_file).stem
    parser = argparse.ArgumentParser(
        prog=Path(script_file).name, description=description, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = parser.add_argument_group("recipe (the defaults are this script's)")
    recipe.add_argument("--epochs", type=positive(int), default=epochs, metavar="N",
                        help="epochs to train (default: %(default)s)")
    recipe.add_argument("--batch-size", type=positive(int), default=batch_size, metavar="N",
                        help="images per step, train and test (default: %(default)s)")
    recipe.add_argument("--lr", type=positive(float), default=lr,
                        help=f"Adam's learning rate, at most {MAX_LR:g} (default: %(default)s)")
    recipe.add_argument("--image-size", type=positive(int), default=image_size, metavar="SIZE",
                        help="images are resized to SIZE x SIZE (default: %(default)s)")
    recipe.add_argument("--seed", type=non_negative(int), default=0,
                        help="decides the new head's initial weights (with --no-pretrained, "
                             "all weights), shuffling, augmentation, dropout, and --dummy's "
                             "images (default: %(default)s)")
    data = parser.add_argument_group("data and weights")
    data.add_argument("--data-dir", type=Path, default=Path("data"), metavar="DIR",
                      help=f"where CIFAR-100 is, or is downloaded to ({CIFAR_ARCHIVE}) "
                           "(default: %(default)s)")
    data.add_argument("--dummy", action="store_true",
                      help="synthetic CIFAR-100-shaped data (50,000/10,000 32x32 images, 100 "
                           "classes), for speed, memory and smoke tests: accuracy then says "
                           "only whether the model can learn at all")
    data.add_argument("--weights", type=Path, metavar="PATH",
                      help=f"a local copy of the published ImageNet weights ({WEIGHTS_FILE}), "
                           "for machines without internet")
    data.add_argument("--no-pretrained", action="store_true",
                      help="random initial weights instead of ImageNet's")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    run.add_argument("--workers", type=non_negative(int), default=default_workers(), metavar="N",
                     help="data loading processes; 0 loads in the main process (default: one "
                          "less than the CPUs available, at most 16: %(default)s here)")
    run.add_argument("--fast", action="store_true",
                     help="opt-in speed mode that changes numerics: bf16 autocast, "
                          "channels_last, torch.compile with CUDA graphs, fused Adam. For "
                          "bug.py it also changes the memory symptom (bf16 halves activations)")
    run.add_argument("--limit-train-batches", type=positive(int), metavar="N",
                     help="train on only N batches per epoch (a symptom check in minutes)")
    run.add_argument("--limit-eval-batches", type=positive(int), metavar="N",
                     help="evaluate on only N batches per epoch")
    out = parser.add_argument_group("results")
    out.add_argument("--output-dir", type=Path, default=Path("results"), metavar="DIR",
                     help="where results and checkpoints go (default: %(default)s)")
    out.add_argument("--run-name", default=script, metavar="NAME",
                     help="results go to DIR/NAME.json and DIR/NAME.pth (default: %(default)s)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the results of an earlier run of the same name")
    out.add_argument("--resume", action="store_true",
                     help="continue the run DIR/NAME from its checkpoint, up to --epochs")
    args = parser.parse_args(argv)
    args.script = script

    if args.lr > MAX_LR:
        parser.error(f"--lr {args.lr:g}: must be at most {MAX_LR:g}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: unknown device; use cuda, cuda:N or cpu")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: unsupported; use cuda, cuda:N or cpu")
    if args.device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("CUDA is not available on this machine: run with --device cpu "
                         "(slow; add --dummy --limit-train-batches N for a quick check)")
        if args.device.index is None:
            args.device = torch.device("cuda", torch.cuda.current_device())
        if args.device.index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
        # The current device too: the loader's pin-memory thread pins for it, and would
        # otherwise open a CUDA context on GPU 0 as well.
        torch.cuda.set_device(args.device)
    if args.data_dir.exists() and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir}: is a file, not a directory")
    if args.weights is not None:
        if args.no_pretrained:
            parser.error("--weights and --no-pretrained contradict each other")
        problem = check_weights_file(args.weights)
        if problem:
            parser.error(f"--weights {args.weights}: {problem}")
    if not args.run_name or os.sep in args.run_name or args.run_name.startswith("."):
        parser.error(f"--run-name {args.run_name!r}: must be a plain file name")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir {args.output_dir}: is a file, not a directory")
    args.results_path = args.output_dir / f"{args.run_name}.json"
    args.checkpoint_path = args.output_dir / f"{args.run_name}.pth"
    args.lock_path = args.output_dir / f".{args.run_name}.lock"
    if args.resume and args.overwrite:
        parser.error("--resume continues a run and --overwrite replaces it: pick one")
    writer = lock_holder(args.lock_path)
    if writer is not None:
        parser.error(still_writing(args, writer))
    problem = run_files_problem(args)
    if problem:
        parser.error(problem)
    for signum in EXIT_SIGNAL:  # until the loop takes over (StopFlag): nothing to save yet
        signal.signal(signum, exit_before_training)
    args.pretrained = "none" if args.no_pretrained else "imagenet"
    # fused Adam is a CUDA kernel; None leaves PyTorch's own default, as in the report.
    args.fused = True if args.fast and args.device.type == "cuda" else None
    return args


def run_files_problem(args):
    """Why this run may not write its files as they are now, or None."""
    if args.resume and not args.checkpoint_path.exists():
        return (f"--resume: no checkpoint {args.checkpoint_path} to resume from "
                "(start the run without --resume)")
    existing = [p for p in (args.results_path, args.checkpoint_path) if p.exists()]
    if existing and not (args.resume or args.overwrite):
        return (f"{existing[0]} holds an earlier run: pass --resume to continue it, "
                "--overwrite to replace it, or --run-name to keep both")
    return None


def lock_holder(lock_path):
    """The process id of a run still writing the files of `lock_path`'s run, or None.
    Only probes: creates nothing, holds nothing. A run holds its lock (take_run_lock)
    until its process ends, however it ends: SIGKILL and power cuts included. (Probing
    from the process that holds the lock would release it: closing any descriptor of a
    file drops the process's POSIX locks on it. parse_args probes before run() takes it.)"""
    if fcntl is None:
        return None
    try:
        lock = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None  # no run has written here
    try:
        return None if try_lock(lock, fcntl.LOCK_SH) else read_holder(lock)
    finally:
        os.close(lock)  # and with it the probe's own lock, if it got one


def take_run_lock(args):
    """Make this process the one writer of the run's files, or stop if another run holds
    them (one started with this one: parse_args refuses any later): two processes writing
    the same files would splice two runs together. The lock is the kernel's, a POSIX
    record lock: it goes with the process, whatever ends it, and data-loading workers,
    forked, do not inherit it."""
    if fcntl is None:
        return None
    try:  # 0o666 less the umask: in a folder shared by a group, the group's runs too
        lock = os.open(args.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        fail(f"cannot lock {args.lock_path}: {error.strerror}")
    # A probe (lock_holder) holds the lock for an instant: a run refuses only a lasting one.
    for _ in range(100):
        if try_lock(lock, fcntl.LOCK_EX):
            break
        time.sleep(0.01)
    else:
        holder = read_holder(lock)
        os.close(lock)
        fail(still_writing(args, holder))
    pid = f"{os.getpid()}\n".encode()  # for the refusal's message: over the last holder's
    os.pwrite(lock, pid, 0)
    os.ftruncate(lock, len(pid))
    return lock  # held while it stays open


@contextmanager
def run_lock(args):
    lock = take_run_lock(args)
    try:
        yield
    finally:
        if lock is not None:
            os.close(lock)  # and with it the lock


def try_lock(lock, kind):
    """False if another process holds a conflicting lock; True if this one got it, or if
    the file system has no locks (some network ones): there nothing can be guarded."""
    try:
        fcntl.lockf(lock, kind | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            return False
    return True


def read_holder(lock):
    """The lock holder's process id, which it writes a moment after taking the lock."""
    for _ in range(100):
        text = os.pread(lock, 32, 0).decode(errors="replace")
        if text.strip():
            return text.split()[0]
        time.sleep(0.01)
    return "unknown"


def still_writing(args, process):
    return (f"{args.results_path}: a run is still writing it (process {process}): "
            "stop it first, or pick another --run-name")


def exit_before_training(signum, frame):
    print(f"\n{signal.Signals(signum).name}: stopped before training started", file=sys.stderr)
    sys.exit(EXIT_SIGNAL[signum])


def positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def non_negative(kind):
    def parse(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def default_workers():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(16, (cpus or 1) - 1))


def check_weights_file(path):
    """Why `path` is not an EfficientNet-b0 state dict in the published layout, or None."""
    if not path.is_file():
        return "no such file"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: the message is what matters
        return f"not a PyTorch state dict ({type(error).__name__})"
    reference = EfficientNet.from_name("efficientnet-b0").state_dict()
    expected = {key: tensor.shape for key, tensor in reference.items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "not a state dict of tensors"
    missing = sorted(expected.keys() - state.keys())
    if missing:
        return f"not an EfficientNet-b0 state dict ({len(missing)} keys missing, e.g. {missing[0]})"
    wrong = [k for k in expected if state[k].shape != expected[k]]
    if wrong:
        return (f"not EfficientNet-b0's shapes ({wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                f"expected {tuple(expected[wrong[0]])})")
    return None


def fail(message):
    """Stop with one clear line and exit status 1: no traceback."""
    raise SystemExit(f"{Path(sys.argv[0]).name}: error: {message}")


# --------------------------------------------------------------------------- data

class SyntheticCIFAR100(Dataset):
    """CIFAR-100-shaped synthetic images: one colour per class plus noise, so a model that
    trains can learn it and one that does not stays at chance. Images are made on demand
    from (seed, split, index), which costs no memory and no start-up time."""

    def __init__(self, train, seed=0):
        self.train, self.seed = train, seed
        self.colours = np.random.default_rng(seed).integers(0, 256, (NUM_CLASSES, 3))

    def __len__(self):
        return TRAIN_IMAGES if self.train else TEST_IMAGES

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, int(self.train), index])
        label = int(rng.integers(NUM_CLASSES))
        noise = rng.integers(-64, 65, (32, 32, 3))
        image = np.clip(self.colours[label] + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(image), label


def mix_seed(*numbers):
    return int(np.random.SeedSequence(numbers).generate_state(1)[0])


class SeededView(Dataset):
    """A dataset seen through a transform whose randomness is a function of (seed, epoch,
    index) alone: results do not depend on --workers, and a resumed run replays exactly.

    When the transform ends with ToTensor() + Normalize(), the workers stop at uint8
    (PILToTensor) and `on_device` does the same float32 arithmetic on the GPU: 4x less data
    through the workers' pipes and into pinned memory, bit-identical numbers."""

    def __init__(self, images, transform, seed):
        self.images, self.seed = images, seed
        self.on_device_constants = {}
        *head, to_tensor, normalize = transform.transforms
        if (isinstance(to_tensor, transforms.ToTensor)
                and isinstance(normalize, transforms.Normalize)):
            self.transform = transforms.Compose([*head, transforms.PILToTensor()])
            self.normalize = normalize
        else:
            self.transform, self.normalize = transform, None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        image, label = self.images[index]
        # Seed only the CPU generator torchvision's random transforms draw from, and put it
        # back afterwards, so that loading never disturbs the model's own randomness.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.transform(image), label

    def on_device(self, images, device, memory_format=torch.contiguous_format):
        # The layout first, while the images are uint8 (a quarter of float32's bytes to
        # move); the arithmetic below keeps it, and does not depend on it.
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        if self.normalize is not None:
            scale, mean, std = self.constants(device)
            # ToTensor's img.float().div(255), then Normalize's sub_(mean).div_(std). Not
            # the Normalize module itself: it checks `(std == 0).any()`, a GPU sync a step.
            images = images.float().div_(scale).sub_(mean).div_(std)
        return images

    def constants(self, device):
        if device not in self.on_device_constants:
            # 255 as a tensor, not a Python scalar: CUDA would multiply by its rounded
            # reciprocal instead of dividing.
            scale = torch.full((), 255.0, device=device)
            mean = torch.as_tensor(self.normalize.mean, dtype=torch.float32, device=device)
            std = torch.as_tensor(self.normalize.std, dtype=torch.float32, device=device)
            self.on_device_constants[device] = scale, mean.view(-1, 1, 1), std.view(-1, 1, 1)
        return self.on_device_constants[device]


class EpochSampler(Sampler):
    """Yields (epoch, index) keys for SeededView: the order is a permutation drawn from
    (seed, epoch) when shuffling, cut to the first `limit` images."""

    def __init__(self, size, seed, shuffle, limit=None):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.limit = min(size, limit) if limit else size
        self.epoch = 0

    def __len__(self):
        return self.limit

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator)[:self.limit].tolist()
        else:
            order = range(self.limit)
        return ((self.epoch, index) for index in order)


def report_transforms(image_size):
    """The report's training transforms, and the test transforms it does not show (the
    same without the random flip and rotation), resizing to `image_size` (the bug's 1024,
    the fix's 224)."""
    train_transforms = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(10),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406],
                             [0.229, 0.224, 0.225])
    ])
    test_transforms = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406],
                             [0.229, 0.224, 0.225])
    ])
    return train_transforms, test_transforms


def cifar100(args):
    """Train and test sets (torchvision's CIFAR100, or --dummy's synthetic twin) seen
    through the report's transforms at --image-size."""
    train_transforms, test_transforms = report_transforms(args.image_size)
    if args.dummy:
        train_set = SyntheticCIFAR100(train=True, seed=args.seed)
        test_set = SyntheticCIFAR100(train=False, seed=args.seed)
    else:
        new_folder = not args.data_dir.exists()
        try:
            train_set = datasets.CIFAR100(args.data_dir, train=True, download=True)
            test_set = datasets.CIFAR100(args.data_dir, train=False, download=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            if new_folder and args.data_dir.is_dir() and not any(args.data_dir.iterdir()):
                args.data_dir.rmdir()  # made by torchvision for the download that failed
            archive = args.data_dir / CIFAR_ARCHIVE
            if archive.is_file() and not check_integrity(archive, datasets.CIFAR100.tgz_md5):
                fail(f"{archive} is incomplete or corrupt (its MD5 checksum does not match) "
                     f"and could not be downloaded again ({error}). Replace it with a fresh "
                     f"download from {CIFAR_URL}, or use --dummy")
            fail(f"CIFAR-100 is not in {args.data_dir}/ and could not be downloaded "
                 f"({error}). Download {CIFAR_ARCHIVE} from {CIFAR_URL} and put it in "
                 f"{args.data_dir}/ (it is unpacked on first use), pass --data-dir, "
                 "or use --dummy")
    return (SeededView(train_set, train_transforms, args.seed),
            SeededView(test_set, test_transforms, args.seed))


def ignore_stop_signals(worker_id):
    # Ctrl-C (and a scheduler's SIGTERM) reach the whole process group: the main process
    # stops the run and shuts the workers down itself, so they must not die under it.
    for signum in EXIT_SIGNAL:
        signal.signal(signum, signal.SIG_IGN)


def make_loader(view, args, train):
    limit = args.limit_train_batches if train else args.limit_eval_batches
    sampler = EpochSampler(len(view), args.seed, shuffle=train,
                           limit=limit * args.batch_size if limit else None)
    return DataLoader(view, batch_size=args.batch_size, sampler=sampler,
                      num_workers=args.workers, pin_memory=args.device.type == "cuda",
                      persistent_workers=args.workers > 0, worker_init_fn=ignore_stop_signals,
                      # its own generator: creating an iterator draws a seed from it, which
                      # would otherwise come from the global RNG and shift dropout's draws
                      generator=torch.Generator())


# --------------------------------------------------------------------------- model

def efficientnet_b0(args):
    """EfficientNet-b0 with ImageNet weights (downloaded, or from --weights), or random
    (--no-pretrained). Seeds torch first, so the script's new head is the same every run."""
    torch.manual_seed(args.seed)
    if args.no_pretrained:
        return EfficientNet.from_name("efficientnet-b0")
    weights = str(args.weights) if args.weights else None
    try:
        return EfficientNet.from_pretrained("efficientnet-b0", weights_path=weights)
    except OSError as error:  # URLError is an OSError
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        fail(f"the ImageNet weights could not be downloaded ({error}). Download "
             f"{WEIGHTS_FILE} from {WEIGHTS_URL} and put it in {hub}/ or pass "
             f"--weights PATH; or use --no-pretrained")


def data_parallel(model, device):
    """nn.DataParallel on the one selected device, as the report has it (so `.module`
    exists), whatever the number of GPUs on the host."""
    if device.type == "cuda":
        return nn.DataParallel(model, device_ids=[device.index])
    parallel = nn.DataParallel(model)  # without CUDA, a plain wrapper
    if parallel.device_ids:  # a GPU host, yet --device cpu: keep the model on the CPU
        parallel.device_ids = []  # forward() then calls the module directly
        parallel.module.to(device)
    return parallel


def count_params(model, optimizer):
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = list(model.parameters())
    return dict(
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        updated_params=sum(p.numel() for p in params if p.requires_grad and id(p) in in_optimizer))


# --------------------------------------------------------------------------- results on disk

def temp_path(path):
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path, write):
    """Write via a temp file in the same folder, fsync, rename: a crash at any instant
    leaves the previous complete file or the new complete one, never a partial one."""
    temp = temp_path(path)
    with open(temp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def save_results(args, config, history, status):
    document = {"script": args.script, "run_name": args.run_name, "status": status,
                "config": config, "epochs": history}
    atomic_write(args.results_path, lambda f: f.write(json.dumps(document, indent=2).encode()))


def save_checkpoint(args, model, optimizer, config, history):
    """The checkpoint carries the whole history: written before the JSON, it is the
    authority a resumed run rebuilds the JSON from."""
    state = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": len(history), "config": config, "history": history}
    atomic_write(args.checkpoint_path, lambda f: torch.save(state, f))


def load_checkpoint(args, config):
    try:
        state = torch.load(args.checkpoint_path, map_location="cpu", weights_only=True)
        epoch, history, saved = state["epoch"], state["history"], state["config"]
    except Exception as error:  # truncated, corrupt or foreign: all mean "cannot resume"
        fail(f"cannot resume: {args.checkpoint_path} is corrupt or not a checkpoint of "
             f"this project ({type(error).__name__}); start afresh with --overwrite")
    differ = [k for k in RECIPE_KEYS if saved.get(k) != config.get(k)]
    if differ:
        details = ", ".join(f"{k} {saved.get(k)!r} there, {config.get(k)!r} here" for k in differ)
        fail(f"cannot resume: {args.checkpoint_path} is another recipe ({details}); use "
             "the same settings, or another --run-name")
    if len(history) != epoch:
        fail(f"cannot resume: {args.checkpoint_path} is inconsistent "
             f"(epoch {epoch}, {len(history)} epochs of history)")
    return state


# --------------------------------------------------------------------------- the run

class Interrupted(Exception):
    pass


class NonFiniteLoss(Exception):
    pass


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next batch; a second one quits at once
    (every file on disk is complete at any instant, so that is safe)."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in EXIT_SIGNAL}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signal is not None:
            os._exit(EXIT_SIGNAL[signum])
        self.signal = signum

    def check(self):
        if self.signal is not None:
            raise Interrupted()


class Meter:
    """Running loss/accuracy kept on the device; read (one sync) at most once a second,
    when the loss of every batch since the last read is checked for NaN/inf too."""

    def __init__(self, bar, where):
        self.bar, self.where = bar, where
        self.loss_sum = self.correct = 0
        self.images = 0
        self.pending = []  # (batch number, loss) not yet checked
        self.start = self.last_read = time.perf_counter()

    def update(self, batch, loss, output, labels):
        n = labels.shape[0]
        self.loss_sum = self.loss_sum + loss.detach().double() * n  # float64: 12,500 adds an epoch
        self.correct = self.correct + (output.argmax(1) == labels).sum()
        self.images += n
        self.pending.append((batch, loss.detach()))
        if time.perf_counter() - self.last_read >= 1.0:
            self.read()

    def read(self):
        self.last_read = time.perf_counter()
        if self.pending:
            finite = torch.isfinite(torch.stack([l.float() for _, l in self.pending])).tolist()
            if not all(finite):
                raise NonFiniteLoss(f"{self.where}, batch {self.pending[finite.index(False)][0]}")
            self.pending.clear()
        loss, acc = self.result()
        seconds = time.perf_counter() - self.start
        self.bar.set_postfix_str(
            f"loss {loss:.4f}  acc {acc:.2f}%  {rate(self.images / seconds)} img/s", refresh=False)

    def result(self):
        if not self.images:
            return float("nan"), float("nan")
        return float(self.loss_sum) / self.images, 100.0 * float(self.correct) / self.images


class Engine:
    """How batches are run: the plain path, or --fast (bf16 autocast, channels_last,
    torch.compile with CUDA graphs). Remembers which shapes were compiled, so the compile
    warm-up is timed apart from the steady epoch."""

    def __init__(self, args, model):
        self.device = args.device
        self.fast = args.fast
        self.cuda = args.device.type == "cuda"
        cannot_compile = compile_problem(self.device) if self.fast else None
        self.compiled = self.fast and cannot_compile is None
        self.memory_format = torch.channels_last if self.fast else torch.contiguous_format
        self.calls = collections.Counter()  # by (training, batch shape)
        self.warmup_seconds, self.warmup_images = 0.0, 0
        if self.fast:
            model.to(memory_format=torch.channels_last)
        if self.compiled:
            # In place, so state_dict keys stay those of the bare EfficientNet; one graph
            # per batch shape and mode (train, eval, last partial batches), compiled once.
            model.module.compile(**COMPILE)
        elif self.fast:
            kept = ("bf16 autocast, channels_last and fused Adam" if self.cuda
                    else "bf16 autocast and channels_last")
            print(f"--fast: {cannot_compile}; without torch.compile, only {kept} apply",
                  flush=True)

    def to_device(self, view, images, labels):
        return (view.on_device(images, self.device, self.memory_format),
                labels.to(self.device, non_blocking=True))

    def forward(self, model, images):
        # --fast: DataParallel on one device checks the device of every parameter and buffer
        # (360 tensors, ~0.5 ms of CPU a step), then calls its module: call that directly.
        if self.fast and isinstance(model, nn.DataParallel) and len(model.device_ids) <= 1:
            return model.module(images)
        return model(images)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self):
        if self.compiled:  # what the eager warm-up left cached would count as reserved
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self):
        """Peak GPU bytes since reset_peak_memory(): allocated, as the report's figure
        counts; with CUDA graphs, reserved, since a replayed graph's tensors live in its
        memory pool, which the allocator holds but does not count as allocated."""
        if self.compiled:
            return torch.cuda.max_memory_reserved(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def autocast(self):
        if not self.fast:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self, training, images, run):
        """Run one batch; returns run()'s result. On the compiled path the first calls of
        each mode and batch shape (compile, an eager warm-up run, CUDA-graph recording) are
        timed, with a sync, as warm-up."""
        if not self.compiled:
            return run()
        torch.compiler.cudagraph_mark_step_begin()
        key = (training, tuple(images.shape))
        self.calls[key] += 1
        if self.calls[key] > COMPILED_WARMUP_CALLS:
            return run()
        self.sync()
        start = time.perf_counter()
        result = run()
        self.sync()
        self.warmup_seconds += time.perf_counter() - start
        self.warmup_images += images.shape[0] if training else 0
        return result


def compile_problem(device):
    """Why --fast cannot compile for `device` (the notice's words), or None."""
    if device.type not in COMPILE_ON:
        return f"torch.compile with CUDA graphs needs CUDA, not {device.type}"
    if device.type == "cuda":
        # Inductor generates Triton kernels: without Triton (e.g. on Windows), compiling
        # would fail in the first step, mid-run.
        if importlib.util.find_spec("triton") is None:
            return "torch.compile needs Triton, which is not installed"
        # And it compiles bf16 only for GPUs with native bf16: on older ones it would skip
        # the graph, silently, and run it eagerly (Triton itself needs 7.0 or newer).
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return (f"torch.compile needs a GPU with native bf16 (compute capability 8.0 or "
                    f"newer); {describe_device(device)} is {major}.{minor}")
    return None


def train_step(model, criterion, optimizer, engine, images, labels):
    def step():
        with engine.autocast():
            output = engine.forward(model, images)
            loss = criterion(output, labels)
        # Every parameter's gradient, not only the optimizer's: bug.py's BatchNorm parameters
        # require grad but are in no optimizer. Their gradients, never read, would pile up
        # step after step, and with CUDA graphs (--fast) into memory the next replay has
        # overwritten: an error. Dropping them changes no number.
        model.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return output, loss
    return engine.step(True, images, step)


def eval_step(model, criterion, engine, images, labels):
    def step():
        with engine.autocast():
            output = engine.forward(model, images)
            return output, criterion(output, labels)
    return engine.step(False, images, step)


def train(model, loader, criterion, optimizer, engine, epoch, stop):
    model.train()
    loader.sampler.epoch = epoch
    with tqdm(loader, desc=f"epoch {epoch} train", unit="batch", leave=False,
              dynamic_ncols=True) as bar:
        meter = Meter(bar, f"epoch {epoch} training")
        for batch, (images, labels) in enumerate(bar, 1):
            stop.check()
            images, labels = engine.to_device(loader.dataset, images, labels)
            output, loss = train_step(model, criterion, optimizer, engine, images, labels)
            meter.update(batch, loss, output, labels)
        meter.read()
    return meter


def validate(model, loader, criterion, engine, epoch, stop):
    model.eval()
    with torch.no_grad(), tqdm(loader, desc=f"epoch {epoch} test", unit="batch", leave=False,
                               dynamic_ncols=True) as bar:
        meter = Meter(bar, f"epoch {epoch} test")
        for batch, (images, labels) in enumerate(bar, 1):
            stop.check()
            images, labels = engine.to_device(loader.dataset, images, labels)
            output, loss = eval_step(model, criterion, engine, images, labels)
            meter.update(batch, loss, output, labels)
        meter.read()
    return meter


def describe_device(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def seed_epoch(seed, epoch):
    """All randomness of epoch `epoch` (dropout, drop-connect; augmentation and shuffling
    seed themselves, see SeededView) derives from (seed, epoch): a resumed run needs no
    saved RNG state to replay exactly."""
    epoch_seed = mix_seed(seed, epoch, 1)
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)  # CPU and every CUDA device


def resume_command():
    argv = [a for a in sys.argv if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return "python " + shlex.join(argv)


def run(args, model, criterion, optimizer, train_set, test_set):
    """Train to --epochs, evaluating, saving the checkpoint and the results after every
    epoch. Exits non-zero (130/143 on SIGINT/SIGTERM, 1 on a non-finite loss or out of
    memory), keeping every finished epoch; an unexpected error marks the results failed."""
    config = dict(
        script=args.script, image_size=args.image_size, batch_size=args.batch_size, lr=args.lr,
        optimizer=type(optimizer).__name__, epochs=args.epochs, seed=args.seed,
        **count_params(model, optimizer), pretrained=args.pretrained,
        weights=None if args.no_pretrained else str(args.weights or WEIGHTS_URL),
        dummy=args.dummy, fast=args.fast, device=describe_device(args.device),
        torch=str(torch.__version__), workers=args.workers,
        limit_train_batches=args.limit_train_batches, limit_eval_batches=args.limit_eval_batches)
    history = []
    if args.resume:
        loaded = args.checkpoint_path.stat().st_mtime_ns
        state = load_checkpoint(args, config)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
    print(f"{args.script}: {config['trainable_params']:,} of {config['total_params']:,} "
          f"parameters require grad, {config['updated_params']:,} of them in the optimizer; "
          f"{args.image_size} px, batch {args.batch_size}, lr {args.lr}, {config['device']}",
          flush=True)
    if args.dummy:
        print("--dummy: synthetic images; accuracy says nothing about CIFAR-100", flush=True)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    # From before the first write until the run ends, this process is the one writer of the
    # run's files, and a Ctrl-C stops it at the next batch, never in the middle of a write.
    with run_lock(args), StopFlag() as stop:
        # Again, now that no other run can write them: one may have ended since parse_args.
        problem = run_files_problem(args)
        if not problem and args.resume and args.checkpoint_path.stat().st_mtime_ns != loaded:
            problem = f"{args.checkpoint_path} changed while this run started: run it again"
        if problem:
            fail(problem)
        for path in (args.results_path, args.checkpoint_path):
            temp_path(path).unlink(missing_ok=True)  # left by a killed run
        if not args.resume:
            # --overwrite: the old JSON goes first, so that it never sits beside the new run's
            # checkpoint; then an epoch-0 checkpoint makes the run resumable at once.
            args.results_path.unlink(missing_ok=True)
            save_checkpoint(args, model, optimizer, config, history)
        if len(history) >= args.epochs:
            config["epochs"] = len(history)  # what it holds, not the lower --epochs asked for
            save_results(args, config, history, "finished")
            print(f"{args.checkpoint_path} already holds {len(history)} epochs; "
                  "raise --epochs to go on")
            return
        save_results(args, config, history, "running")

        try:
            engine = Engine(args, model)
            train_loader = make_loader(train_set, args, train=True)
            test_loader = make_loader(test_set, args, train=False)
            if engine.cuda:
                torch.backends.cudnn.benchmark = True
            for epoch in range(len(history) + 1, args.epochs + 1):
                seed_epoch(args.seed, epoch)
                if engine.cuda:
                    engine.reset_peak_memory()
                engine.warmup_seconds, engine.warmup_images = 0.0, 0
                start = time.perf_counter()
                trained = train(model, train_loader, criterion, optimizer, engine, epoch, stop)
                train_seconds = time.perf_counter() - start
                if trained.images > engine.warmup_images:  # the steady rate, compiling aside
                    train_rate = ((trained.images - engine.warmup_images)
                                  / (train_seconds - engine.warmup_seconds))
                else:
                    train_rate = trained.images / train_seconds
                tested = validate(model, test_loader, criterion, engine, epoch, stop)
                (train_loss, train_acc), (test_loss, test_acc) = trained.result(), tested.result()
                entry = dict(
                    epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                    test_acc=test_acc, epoch_seconds=time.perf_counter() - start,
                    train_images_per_second=train_rate,
                    peak_gpu_memory_gib=engine.peak_memory() / 2**30 if engine.cuda else None)
                if engine.compiled:
                    entry["warmup_seconds"] = engine.warmup_seconds
                history.append(entry)
                save_checkpoint(args, model, optimizer, config, history)
                save_results(args, config, history, "running")
                print(epoch_line(entry, args.epochs), flush=True)
        except Interrupted:
            save_results(args, config, history, "interrupted")
            name = signal.Signals(stop.signal).name
            print(f"\n{name}: stopped during epoch {len(history) + 1}; {args.results_path} holds "
                  f"{len(history)} finished epoch(s). Resume with:\n  {resume_command()}",
                  file=sys.stderr)
            sys.exit(EXIT_SIGNAL[stop.signal])
        except NonFiniteLoss as where:
            save_results(args, config, history, "failed")
            fail(f"the loss became NaN or infinite ({where}); {args.results_path} keeps the "
                 f"{len(history)} finished epoch(s). Try a lower --lr, as a new run "
                 "(--overwrite, or another --run-name)")
        except torch.OutOfMemoryError:
            save_results(args, config, history, "failed")
            fail(f"out of GPU memory in epoch {len(history) + 1} ({config['device']}); "
                 f"{args.results_path} keeps the {len(history)} finished epoch(s). A smaller "
                 "--batch-size or --image-size needs less, as a new run (--overwrite, or another "
                 "--run-name); bug.py's recipe takes about 11 GB, fixed.py's about 7 GB")
        except Exception:  # unexpected: recorded, then its traceback, which a bug report needs
            save_results(args, config, history, "failed")
            raise
        save_results(args, config, history, "finished")
    print(f"done: {args.results_path} and {args.checkpoint_path}")


def build(script, argv):
    """Run `script` (bug.py or fixed.py) with `argv` up to training.run() and return what
    it would have trained, untrained: args, model, criterion, optimizer, train_set,
    test_set. For measuring and testing the scripts' own objects, never a copy of them."""
    captured = {}

    def capture(args, model, criterion, optimizer, train_set, test_set):
        captured.update(args=args, model=model, criterion=criterion, optimizer=optimizer,
                        train_set=train_set, test_set=test_set)

    global run
    real_run, real_argv = run, sys.argv
    handlers = {signum: signal.getsignal(signum) for signum in EXIT_SIGNAL}
    run, sys.argv = capture, [str(script), *map(str, argv)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:  # parse_args installs the scripts' signal handlers: give the caller its own back
        run, sys.argv = real_run, real_argv
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return SimpleNamespace(**captured)


def rate(images_per_second):
    """82 img/s, 1,170 img/s, and on a CPU 0.21 img/s rather than 0."""
    if images_per_second >= 100:
        return f"{images_per_second:,.0f}"
    return f"{images_per_second:.2g}"


def epoch_line(entry, epochs):
    compiled = "warmup_seconds" in entry
    memory = entry["peak_gpu_memory_gib"]
    peak = ("" if memory is None  # the CPU
            else f", peak {memory:.2f} GiB" + (" reserved" if compiled else ""))  # peak_memory()
    warmup = f", compile warm-up {entry['warmup_seconds']:.0f} s" if compiled else ""
    return (f"epoch {entry['epoch']}/{epochs}: train loss {entry['train_loss']:.4f} "
            f"acc {entry['train_acc']:.2f}% | test loss {entry['test_loss']:.4f} "
            f"acc {entry['test_acc']:.2f}% | {entry['epoch_seconds']:.1f} s, "
            f"{rate(entry['train_images_per_second'])} train img/s{peak}{warmup}")
