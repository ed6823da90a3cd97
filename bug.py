"""The bug: ImageNet-pretrained EfficientNet-b0 fine-tuned on CIFAR-100 as in the report.

Nothing learns (accuracy stays at chance, the loss does not fall), each epoch takes hours and
the GPU memory is huge. Four root causes, each marked ROOT CAUSE below; fixed.py fixes them.
"""
import torch.nn as nn
import torch.optim as optim
from torchvision import transforms

import training

IMAGE_SIZE = 1024  # ROOT CAUSE 2: 32x32 images blown up to 1024x1024; b0 expects 224x224
BATCH_SIZE = 4     # ROOT CAUSE 4: batch too small
LR = 0.01          # ROOT CAUSE 3: learning rate too large
EPOCHS = 40

args = training.parse_args(__file__, __doc__, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR,
                           image_size=IMAGE_SIZE)

train_transforms = transforms.Compose([
    transforms.Resize((args.image_size, args.image_size)),
    transforms.RandomHorizontalFlip(),
    transforms.RandomRotation(10),
    transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406],
                         [0.229, 0.224, 0.225])
])
test_transforms = transforms.Compose([
    transforms.Resize((args.image_size, args.image_size)),
    transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406],
                         [0.229, 0.224, 0.225])
])
train_data, test_data = training.cifar100(args, train_transforms, test_transforms)

model_transfer = training.efficientnet_b0(args)
model_transfer._fc = nn.Linear(model_transfer._fc.in_features, 100)
model_transfer = training.data_parallel(model_transfer, args.device)

# ROOT CAUSE 1: every parameter without "bn" in its name is frozen, and then the new head
# too: only BatchNorm's affine parameters still require grad...
for name, param in model_transfer.module.named_parameters():
    if("bn" not in name):
        param.requires_grad = False

for param in model_transfer.module._fc.parameters():
    param.requires_grad = False

print(model_transfer.module._fc.in_features)

criterion_transfer = nn.CrossEntropyLoss()
# ...and the optimizer holds only the frozen head: no parameter is ever updated.
optimizer_transfer = optim.Adam(model_transfer.module._fc.parameters(), lr=args.lr,
                                fused=args.fused)

training.run(args, model_transfer, criterion_transfer, optimizer_transfer, train_data, test_data)
