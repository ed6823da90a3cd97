"""CIFAR-100 (or --dummy's synthetic twin) through the report's transforms, and an epoch's
batches from DataLoader workers (--fast has its own, in fast.py). An epoch depends on
(seed, epoch) alone, not on --workers: a resume replays it."""
import os
import shutil
import signal
import sys
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from .errors import STOPS, RunError, hold, stops_held

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000  # CIFAR-100's, and --dummy's
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
DEFAULT_WORKERS = max(0, min(16, (CPUS or 1) - 1))  # the CPUs less one, at most 16
CIFAR_ARCHIVE, CIFAR_URL = datasets.CIFAR100.filename, datasets.CIFAR100.url


def cifar100(args):
    """Train and test sets (CIFAR-100, or --dummy's) through the report's transforms."""
    train_transforms = transforms.Compose([
        transforms.Resize((args.image_size, args.image_size)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(10),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406],
                             [0.229, 0.224, 0.225])
    ])
    # The test transforms, which the report does not show: the same, less the random ones.
    resize, _, _, *to_tensor_and_normalize = train_transforms.transforms
    test_transforms = transforms.Compose([resize, *to_tensor_and_normalize])
    train_set, test_set = (synthetic_cifar100(train, args.seed) if args.dummy
                           else load_cifar100(args.data_dir, train)
                           for train in (True, False))
    return (SeededView(train_set, train_transforms, args.seed),
            SeededView(test_set, test_transforms, args.seed))


class LoaderBatches:
    """An epoch's (images, labels) on the device; set_epoch(epoch) first. The workers'
    PIL transforms stop at uint8 (a quarter of float32's bytes to pass on); ToTensor's
    scaling and Normalize run on the device, in the same float32 arithmetic."""
    def __init__(self, view, args, train):
        sampler = EpochSampler(view, args, train)
        self.view, self.device, self.set_epoch = view, args.device, sampler.set_epoch
        # Its own generator: a new iterator draws a seed from it, which would otherwise
        # shift the global RNG (and dropout).
        self.loader = DataLoader(view, batch_size=args.batch_size, sampler=sampler,
                                 num_workers=args.workers,
                                 persistent_workers=args.workers > 0,
                                 pin_memory=args.device.type == "cuda",
                                 worker_init_fn=quiet_worker, generator=torch.Generator())

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        scale, mean, std = normalize_constants(self.view.normalize, self.device)
        with stops_held():  # the workers start here
            batches = iter(self.loader)
        for images, labels in batches:
            images = images.to(self.device, non_blocking=True)
            # ToTensor's img.float().div(255), then Normalize's sub_(mean).div_(std). Not
            # the Normalize module itself: it checks `(std == 0).any()`, a sync a step.
            images = images.float().div_(scale).sub_(mean).div_(std)
            yield images, labels.to(self.device, non_blocking=True)


def quiet_worker(worker_id):
    # Ctrl-C or a scheduler's SIGTERM goes to the process group: in a group of their own
    # workers do not hear it, and end with the main process. A stop sent to each process
    # (pkill) ends them quietly: the worker loop takes it as Ctrl-C. They print nothing: a
    # stop may cut a hand-over short, and their errors reach the main process anyway.
    if hasattr(os, "setpgrp"):  # POSIX
        os.setpgrp()
    sys.stderr = open(os.devnull, "w")
    for signum in STOPS:
        signal.signal(signum, signal.default_int_handler)
    hold(signal.SIG_UNBLOCK)  # held since the fork (stops_held)


def normalize_constants(normalize, device):
    # 255 as a tensor, not a Python scalar: CUDA would multiply by its rounded reciprocal.
    return (torch.full((), 255.0, device=device),
            torch.tensor(normalize.mean, device=device).view(-1, 1, 1),
            torch.tensor(normalize.std, device=device).view(-1, 1, 1))


class SeededView(Dataset):
    """A data set through a transform whose draws depend on (seed, epoch, index) alone,
    at the sampler's (epoch, index) keys. ToTensor and Normalize are the batches' job."""
    def __init__(self, images, transform, seed):
        self.images, self.seed = images, seed
        *head, to_tensor, self.normalize = transform.transforms
        assert isinstance(to_tensor, transforms.ToTensor), to_tensor
        self.transform = transforms.Compose([*head, transforms.PILToTensor()])

    def __len__(self):
        return len(self.images.data)

    def __getitem__(self, key):
        epoch, index = key
        image = Image.fromarray(self.images.data[index])
        # Seed only the CPU generator torchvision's random transforms draw from, and put
        # it back afterwards, so that loading never disturbs the model's own randomness.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.transform(image), self.images.targets[index]


class EpochSampler(Sampler):
    """The (epoch, index) keys of SeededView for an epoch of training (a permutation drawn
    from (seed, epoch)) or of testing (in order), cut to --limit-*-batches."""
    def __init__(self, view, args, train):
        self.size, self.seed, self.shuffle, self.epoch = len(view), args.seed, train, 0
        limit = args.limit_train_batches if train else args.limit_eval_batches
        self.limit = min(self.size, limit * args.batch_size) if limit else self.size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.limit

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator)[:self.limit].tolist()
        else:
            order = range(self.limit)
        return ((self.epoch, index) for index in order)


def mix_seed(*numbers):
    return int(np.random.SeedSequence(numbers).generate_state(1)[0])


def synthetic_cifar100(train, seed):
    """CIFAR-100-shaped images, held as CIFAR100 holds its own (`data`, `targets`): a
    colour per class plus noise, which a model that trains learns."""
    colours = np.random.default_rng(seed).integers(0, 256, (100, 3), dtype=np.int16)
    rng = np.random.default_rng([seed, int(train)])  # the same classes, other images
    size = TRAIN_IMAGES if train else TEST_IMAGES
    targets = rng.integers(100, size=size)  # classes
    images = rng.integers(-64, 65, (size, 32, 32, 3), dtype=np.int16)
    images += colours[targets, None, None]  # in place: 300 MB less to allocate
    return SimpleNamespace(data=images.clip(0, 255, out=images).astype(np.uint8),
                           targets=targets.tolist())


def load_cifar100(folder, train):
    """torchvision's CIFAR100 from `folder`, downloaded if missing, or a RunError."""
    # The outermost folder the download makes, to take away again if it fails.
    made = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    try:
        return datasets.CIFAR100(folder, train=train, download=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        if made and made.is_dir() and not any(p.is_file() for p in made.rglob("*")):
            shutil.rmtree(made)
        archive, unpacked = folder / CIFAR_ARCHIVE, folder / datasets.CIFAR100.base_folder
        if archive.is_file() and not check_integrity(archive, datasets.CIFAR100.tgz_md5):
            problem = f"{archive} is incomplete or corrupt (its MD5 checksum differs)"
        elif unpacked.exists():
            problem = f"{unpacked} is incomplete or corrupt (its checksums do not match)"
        else:
            problem = f"CIFAR-100 is not in {folder}/"
        raise RunError(f"{problem} and could not be downloaded ({error}). Download "
                       f"{CIFAR_ARCHIVE} from {CIFAR_URL} into {folder}/ (it is unpacked "
                       "on first use), pass --data-dir, or use --dummy") from None
