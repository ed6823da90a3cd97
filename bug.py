"""The bug: ImageNet-pretrained EfficientNet-b0 fine-tuned on CIFAR-100 as in the report.

Nothing learns (accuracy stays at chance, the loss does not fall), an epoch took 1.5
hours on the report's A40 and about 11 GB of GPU memory. Four root causes, each marked
ROOT CAUSE in this file; fixed.py fixes them.
"""
import torch
import torch.nn as nn
import torch.optim as optim

import training

IMAGE_SIZE = 1024  # ROOT CAUSE 2: 32x32 images resized to 1024x1024, not the 224x224 b0
                   # expects: ~20x the compute and memory of 224, for no extra information
BATCH_SIZE = 4     # ROOT CAUSE 4: too small for steady steps and BatchNorm statistics
LR = 0.01          # ROOT CAUSE 3: a little large for fine-tuning with Adam
EPOCHS = 40


def build(args):
    """The report's data, model, loss and optimizer."""
    # CIFAR-100 through the report's transforms, resized to args.image_size
    train_data, test_data = training.cifar100(args)

    model_transfer = training.efficientnet_b0(args)
    model_transfer._fc = nn.Linear(model_transfer._fc.in_features, 100)
    model_transfer = training.data_parallel(model_transfer, args.device)

    # ROOT CAUSE 1: every parameter without "bn" in its name is frozen, and then the new
    # head too: only BatchNorm's affine parameters still require grad...
    for name, param in model_transfer.module.named_parameters():
        if("bn" not in name):
            param.requires_grad = False

    for param in model_transfer.module._fc.parameters():
        param.requires_grad = False

    print(model_transfer.module._fc.in_features)

    criterion_transfer = nn.CrossEntropyLoss()
    # ...and the optimizer holds only the frozen head: no parameter is ever updated.
    optimizer_transfer = optim.Adam(model_transfer.module._fc.parameters(), lr=args.lr)
    return model_transfer, criterion_transfer, optimizer_transfer, train_data, test_data


def train(model, batches, criterion, optimizer):
    """One epoch of training. `batches` gives (images, labels) on the device, and
    keeps the epoch's figures and its progress bar."""
    model.train()
    for images, labels in batches:
        optimizer.zero_grad()
        output = model(images)
        loss = criterion(output, labels)
        loss.backward()
        optimizer.step()
        batches.record(loss, output, labels)


def validate(model, batches, criterion):
    model.eval()
    with torch.no_grad():
        for images, labels in batches:
            output = model(images)
            loss = criterion(output, labels)
            batches.record(loss, output, labels)


if __name__ == "__main__":
    with training.command_line(__file__, __doc__, epochs=EPOCHS, batch_size=BATCH_SIZE,
                               lr=LR, image_size=IMAGE_SIZE) as args:
        training.run(args, *build(args), train=train, validate=validate)
