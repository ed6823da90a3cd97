"""--fast on the CPU: its batches keep the default path's order and replay; its test images
are the report's; steady images/s leave the warm-up out; it learns the synthetic set."""
import json
import time

import pytest
import torch
import torch.nn as nn

import training
from conftest import TINY, build
from training.data import batches

SMALL = ["--dummy", "--device", "cpu", "--no-pretrained", "--workers", "0", "--image-size",
         "64", "--batch-size", "8", "--limit-train-batches", "3", "--limit-eval-batches", "2"]


def epoch_of(view, args, train, epoch):
    source = batches(view, args, train)
    source.set_epoch(epoch)
    return list(source)


@pytest.fixture(scope="module")
def fast():
    return build("fixed.py", *SMALL, "--fast")


def test_fast_keeps_the_default_paths_order_and_replays(fast):
    default = build("fixed.py", *SMALL)
    for train in (True, False):
        view = fast.train_data if train else fast.test_data
        plain = epoch_of(default.train_data if train else default.test_data, default.args,
                         train, 1)
        once, again = (epoch_of(view, fast.args, train, 1) for _ in range(2))
        assert [labels.tolist() for _, labels in once] == [l.tolist() for _, l in plain]
        for (images, _), (same, _) in zip(once, again):
            assert torch.equal(images, same)  # the same (seed, epoch): the same batches
        assert once[0][0].shape == plain[0][0].shape == (8, 3, 64, 64)
        assert once[0][0].is_contiguous(memory_format=torch.channels_last)
    later = epoch_of(fast.train_data, fast.args, True, 2)
    assert [l.tolist() for _, l in later] != [l.tolist() for _, l in once]


def test_fast_test_images_are_the_reports(fast):
    """No augmentation at test time: resize and normalize, as the PIL pipeline does."""
    default = build("fixed.py", *SMALL)
    (images, _), (plain, _) = (epoch_of(built.test_data, built.args, False, 1)[0]
                               for built in (fast, default))
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    levels = ((images - plain) * std * 255).abs()  # in uint8 levels, before normalising
    assert levels.max() < 0.01, levels.max()


def test_fast_augments_each_image_on_its_own(fast):
    """Flip and rotation drawn per image: copies of one image come out different."""
    view = fast.train_data
    source = batches(view, fast.args, train=True)
    source.images[:] = source.images[:1].clone()  # every image the same
    source.set_epoch(1)
    images, _ = next(iter(source))
    assert len({tuple(image.flatten()[::97].tolist()) for image in images}) > 4


class SlowAtFirst(nn.Module):
    """A stand-in for a compiled model: its first two calls (compile, CUDA-graph capture)
    and its first call at a new batch size (a new graph) take 0.3 s more."""

    def __init__(self):
        super().__init__()
        self.linear, self.seen = nn.Linear(3, 100), {}

    def forward(self, images):
        calls = self.seen[len(images)] = self.seen.get(len(images), 0) + 1
        if calls <= 2:
            time.sleep(0.3)
        return self.linear(images.mean((2, 3)))


def test_steady_images_per_second_leave_the_warmup_out():
    args = training.parse_args("fixed.py", "", epochs=1, batch_size=4, lr=0.005, image_size=32,
                               argv=[*TINY, "--fast"])
    model = nn.DataParallel(SlowAtFirst())
    optimizer = torch.optim.Adam(model.parameters())
    data = [(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))] * 12
    data.append((torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)))  # the last, partial
    epoch = type("Epoch", (list,), {"set_epoch": lambda self, epoch: None})(data)
    meter = training.train(model, epoch, nn.CrossEntropyLoss(), optimizer, 1, args,
                           compiled=True)
    assert meter.images == 50
    assert meter.warmup_seconds > 0.9  # 2 warm-up steps and the partial batch's first
    steady_seconds = meter.seconds - meter.warmup_seconds
    assert meter.rate() == pytest.approx(4 * 10 / steady_seconds, rel=0.2)  # 10 steady batches


def test_fast_learns_the_synthetic_set(tmp_path):
    """Batch 128 gives BatchNorm steady statistics and Adam a steady gradient: the loss falls
    in 3 epochs of 3 batches, by a wide margin. Deterministic: fixed seed, no workers."""
    built = build("fixed.py", "--dummy", "--device", "cpu", "--no-pretrained", "--workers", "0",
                  "--image-size", "32", "--batch-size", "128", "--limit-train-batches", "3",
                  "--limit-eval-batches", "1", "--epochs", "3", "--output-dir", tmp_path, "--fast")
    training.run(built.args, built.model, built.criterion, built.optimizer, built.train_data,
                 built.test_data)
    losses = [e["train_loss"] for e in json.loads((tmp_path / "fixed.json").read_text())["epochs"]]
    assert losses[-1] < losses[0] - 0.3, losses
