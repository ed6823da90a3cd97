"""The fix: the same fine-tuning of EfficientNet-b0 on CIFAR-100, with the report's fixes.

Nothing frozen, 224x224 inputs, lr 0.005, batch 64: the model learns, an epoch takes
minutes and memory is modest. Each FIX here answers a ROOT CAUSE of bug.py.
"""
import torch
import torch.nn as nn
import torch.optim as optim

import training

IMAGE_SIZE = 224   # FIX 2: the resolution b0 was trained at
                   # (the report: 1.5 h an epoch becomes 3 min)
BATCH_SIZE = 64    # FIX 4
LR = 0.005         # FIX 3
EPOCHS = 40


def build(args):
    """The report's data, model, loss and optimizer."""
    # CIFAR-100 through the report's transforms, resized to args.image_size
    train_data, test_data = training.cifar100(args)

    model_transfer = training.efficientnet_b0(args)
    model_transfer._fc = nn.Linear(model_transfer._fc.in_features, 100)
    model_transfer = training.data_parallel(model_transfer, args.device)

    print(model_transfer.module._fc.in_features)

    criterion_transfer = nn.CrossEntropyLoss()
    # FIX 1: nothing is frozen, and the optimizer gets every parameter.
    optimizer_transfer = optim.Adam(model_transfer.parameters(), lr=args.lr)
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
