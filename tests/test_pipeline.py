"""The epochs around the scripts' step, on the CPU: --fast's batches against the default
path's, the whole batches --fast gives its model, the test figures, and the warm-up left
out of the images/s."""
import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import training
from conftest import SMALL, TEST_N, build, train_for_real, write_cifar
from training.loop import prepare

# On the `cifar` fixture: 64 px (test images are resized, not kept), 3 training batches.
AT_64 = [*SMALL, "--image-size", "64",
         "--limit-train-batches", "3", "--limit-eval-batches", "2"]


def epoch_of(built, train, epoch):
    """The (images, labels) batches of a training or test epoch, as a run makes them."""
    _, train_batches, test_batches = prepare(built.model, built.train_data,
                                             built.test_data, built.args)
    batches = train_batches if train else test_batches
    batches.set_epoch(epoch)
    return list(batches)


def test_fast_keeps_the_default_paths_order_and_replays(cifar):
    default, fast = build("fixed.py", *AT_64), build("fixed.py", *AT_64, "--fast")
    for train in (True, False):
        plain = epoch_of(default, train, 1)
        once, again = (epoch_of(fast, train, 1) for _ in range(2))
        assert [labels.tolist() for _, labels in once] == [y.tolist() for _, y in plain]
        for (images, _), (same, _) in zip(once, again):
            assert torch.equal(images, same)  # the same (seed, epoch): the same batches
        assert once[0][0].shape == plain[0][0].shape == (4, 3, 64, 64)
        assert once[0][0].is_contiguous(memory_format=torch.channels_last)
        if not train:  # no augmentation: resized and normalised as the PIL pipeline does
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            levels = ((once[0][0] - plain[0][0]) * std * 255).abs()  # in uint8 levels
            assert levels.max() < 0.01, levels.max()
    later = epoch_of(fast, True, 2)
    first = epoch_of(fast, True, 1)
    assert [y.tolist() for _, y in later] != [y.tolist() for _, y in first]


def test_fast_augments_each_image_on_its_own(monkeypatch):
    """Flip and rotation drawn per image: copies of one image come out different."""
    write_cifar(Path("data"), monkeypatch, same_image=True)
    images, _ = epoch_of(build("fixed.py", *AT_64, "--fast"), True, 1)[0]
    assert len({tuple(image.flatten()[::97].tolist()) for image in images}) > 2


def test_fast_gives_its_model_whole_batches_and_counts_each_test_image_once(
        cifar, tmp_path):
    """12 training images at batch 5: two batches, 2 images left out of the epoch; 8 test
    images: 5, then 3 padded to 5 for the model, and only the 3 counted."""
    built = build("fixed.py", *SMALL, "--fast", "--batch-size", "5", "--epochs", "1",
                  "--limit-train-batches", "3", "--limit-eval-batches", "2")
    sizes, labels = [], cifar.test[1]

    # class c for every image, any batch
    def predict_the_last_label(module, inputs, output):
        sizes.append(len(inputs[0]))
        return output * 0 + nn.functional.one_hot(torch.tensor(labels[-1]), 100)
    built.model.module.register_forward_hook(predict_the_last_label)
    train_for_real(built)
    assert sizes == [5] * 4  # 2 training batches, 2 test batches
    [entry] = json.loads((tmp_path / "results/fixed.json").read_text())["epochs"]
    accuracy = 100 * labels.count(labels[-1]) / TEST_N
    assert entry["test_acc"] == pytest.approx(accuracy)
    # cross-entropy of logits 1 at c and 0 elsewhere: log(99 + e) - 1 where the label is c
    loss = torch.tensor(99 + torch.e).log() - accuracy / 100
    assert entry["test_loss"] == pytest.approx(loss)


class SlowAtFirst(nn.Module):
    """A stand-in model: each training step takes 0.2 s, and the first two (as a compile
    and a CUDA-graph capture would) 0.5 s more; testing takes no time."""

    def __init__(self):
        super().__init__()
        self.linear, self.steps = nn.Linear(3, 100), 0

    def forward(self, images):
        if self.training:
            self.steps += 1
            time.sleep(0.2 + 0.5 * (self.steps <= 2))
        return self.linear(images.mean((2, 3)))


def test_images_per_second_leave_the_warmup_out(cifar, tmp_path):
    """6 training steps of 2 images: 2 of warm-up (1.4 s), then 4 at 0.2 s: 10 img/s, not
    the 5.5 of the whole loop. The warm-up is reported apart."""
    built = build("fixed.py", *SMALL, "--batch-size", "2", "--limit-train-batches", "6",
                  "--limit-eval-batches", "4", "--epochs", "1")
    built.model = training.data_parallel(SlowAtFirst(), built.args.device)
    built.optimizer = torch.optim.Adam(built.model.parameters())
    train_for_real(built)
    [entry] = json.loads((tmp_path / "results/fixed.json").read_text())["epochs"]
    assert entry["train_images_per_second"] == pytest.approx(10, rel=0.15)
    assert entry["warmup_seconds"] == pytest.approx(1.4, abs=0.15)


def test_fast_learns_the_synthetic_set(tmp_path):
    """Batch 128 gives BatchNorm steady statistics, Adam a steady gradient: the loss falls
    in 3 epochs of 3 batches, by a wide margin. Deterministic: fixed seed, no workers."""
    built = build("fixed.py", "--dummy", "--device", "cpu", "--no-pretrained",
                  "--workers", "0", "--image-size", "32", "--batch-size", "128",
                  "--limit-train-batches", "3", "--limit-eval-batches", "1",
                  "--epochs", "3", "--fast")
    train_for_real(built)
    epochs = json.loads((tmp_path / "results/fixed.json").read_text())["epochs"]
    losses = [entry["train_loss"] for entry in epochs]
    assert losses[-1] < losses[0] - 0.3, losses
