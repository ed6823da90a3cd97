"""Everything --fast adds, behind prepare(); the step calls what it returns as `model`.
At batch 64 the eager step is bound by kernel launches: CUDA graphs replay a step at once.
A graph replays one shape: an epoch's last, partial training batch is left out, the last
test batch padded. To feed it, the data set is augmented on the device (augment.py)."""
import importlib.util

import numpy as np
import torch
import torch.nn as nn

from . import augment
from .data import EpochSampler, mix_seed, normalize_constants


def prepare(model, train_data, test_data, args):
    """(model for the step, training batches, test batches), as --fast runs them."""
    return (FastModel(model, args), DeviceBatches(train_data, args, train=True),
            DeviceBatches(test_data, args, train=False))


class FastModel(nn.Module):
    """The step's `model` with --fast: channels_last, bf16 autocast, compiled with CUDA
    graphs where it can be, and called past nn.DataParallel (~0.5 ms of checks a step).
    A replayed graph's tensors live in a pool the allocator holds but does not count as
    allocated: with --fast, the peak memory reported is reserved."""

    def __init__(self, model, args):
        super().__init__()
        self.model, self.batch_size = model, args.batch_size
        self.device_type = args.device.type
        model.to(memory_format=torch.channels_last)
        problem = compile_problem(args.device)
        if problem:
            print(f"--fast: {problem}; the rest of --fast applies, without torch.compile",
                  flush=True)
        else:  # in place, so that the state dict's keys do not change
            model.module.compile(mode="reduce-overhead", dynamic=False)
        self.cuda_graphs = problem is None

    def forward(self, images):
        real = len(images)
        if real < self.batch_size:  # the last test batch: in eval mode images do not mix
            assert not self.training, "a partial batch would train BatchNorm on zeros"
            padding = images.new_zeros(self.batch_size - real, *images.shape[1:])
            images = torch.cat([images, padding])
            images = images.contiguous(memory_format=torch.channels_last)
        if self.cuda_graphs:
            # A step's outputs and gradients live in memory that the next replay
            # overwrites: nothing may outlive its step, not even a gradient that no
            # optimizer clears (the bug's BatchNorm parameters). None changes no number.
            torch.compiler.cudagraph_mark_step_begin()
            if self.training:
                self.model.zero_grad(set_to_none=True)
        with torch.autocast(self.device_type, torch.bfloat16):
            output = self.model.module(images)
        return output[:real].float()  # the loss in float32, as autocast would compute it


def compile_problem(device):
    """Why torch.compile with CUDA graphs cannot run on `device`, or None."""
    if device.type != "cuda":
        return f"torch.compile with CUDA graphs needs CUDA, not {device.type}"
    if importlib.util.find_spec("triton") is None:  # (Windows) it would fail mid-run
        return "torch.compile needs Triton, which is not installed"
    if torch.cuda.get_device_capability(device) < (8, 0):  # a T4, a V100: no native bf16
        name = torch.cuda.get_device_name(device)
        return f"torch.compile needs native bf16, which {name} lacks"
    return None


class DeviceBatches:
    """The data set on the device as uint8, gathered in the default path's order and
    augmented in whole batches, drawing from (seed, epoch): no workers, no host sync."""

    def __init__(self, view, args, train):
        self.sampler, self.args = EpochSampler(view, args, train), args
        self.set_epoch = self.sampler.set_epoch
        images = torch.from_numpy(np.asarray(view.images.data))
        self.images = images.to(args.device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.as_tensor(view.images.targets, dtype=torch.long,
                                      device=args.device)
        # ToTensor's scaling and Normalize in one multiply-add: (x / 255 - mean) / std.
        scale, mean, std = normalize_constants(view.normalize, args.device)
        self.gain, self.shift = 1 / (scale * std), -mean / std
        self.generator = torch.Generator(args.device)

    def __len__(self):  # in training whole batches only, in testing all
        whole, partial = divmod(len(self.sampler), self.args.batch_size)
        return whole + (partial > 0 and not self.sampler.shuffle)

    def __iter__(self):
        order = [index for _, index in self.sampler][:len(self) * self.args.batch_size]
        order = torch.tensor(order, device=self.args.device)
        self.generator.manual_seed(mix_seed(self.args.seed, self.sampler.epoch, 2))
        for indices in order.split(self.args.batch_size):
            images = augment.resize(self.images[indices], self.args.image_size)
            if self.sampler.shuffle:
                flips, angles = augment.draw(self.generator, len(indices))
                images = augment.flip_rotate(images, flips, angles)
            images = images.contiguous(memory_format=torch.channels_last)
            yield torch.addcmul(self.shift, images, self.gain), self.labels[indices]
