"""What docs/speed.md reports of --fast's data path on a GPU, measured in one go:

    python docs/gpu_check.py     (from the repository's root, on a machine with CUDA)

fidelity of training/augment.py to the report's PIL pipeline given the same flip and
angle, with TF32 matmuls off (PyTorch's default) and on; host syncs while batches are
made; the same batches for the same (seed, epoch); and the data path's own images/s."""
import json
import sys
import time

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

sys.path.insert(0, ".")
import fixed  # noqa: E402
import training  # noqa: E402
from training import augment  # noqa: E402
from training.fast import DeviceBatches  # noqa: E402

out = {}
images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
flips, angles = torch.arange(32) % 2 == 1, torch.linspace(-10, 10, 32)
# TF32: what torch.compile's warning invites users to switch on
for tf32 in (False, True):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    for size, n in ((224, 32), (1024, 4)):
        x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).cuda()
        resized = augment.resize(x, size)
        got = augment.flip_rotate(resized, flips[:n].cuda(), angles[:n].cuda())
        want = []
        for i in range(n):
            image = F.resize(Image.fromarray(images[i]), [size, size])
            image = F.hflip(image) if flips[i] else image
            want.append(F.pil_to_tensor(F.rotate(image, float(angles[i]),
                                                 InterpolationMode.NEAREST, fill=0)))
        diff = (got.cpu() - torch.stack(want).float()).abs()
        out[f"fidelity_{size}{'_tf32' if tf32 else ''}"] = dict(
            mean=diff.mean().item(), within1=(diff <= 1).float().mean().item())
torch.backends.cuda.matmul.allow_tf32 = False
torch.set_float32_matmul_precision("highest")

args = training.parse_args(fixed.__file__, fixed.__doc__, epochs=1,
                           batch_size=fixed.BATCH_SIZE, lr=fixed.LR,
                           image_size=fixed.IMAGE_SIZE,
                           argv=["--dummy", "--no-pretrained", "--fast", "--workers", "0",
                                 "--output-dir", "/tmp/gpu_check"])
train_data, _ = training.cifar100(args)
source = DeviceBatches(train_data, args, train=True)
source.set_epoch(1)
epoch = iter(source)
first = next(epoch)
torch.cuda.set_sync_debug_mode("error")
try:
    for _ in range(20):
        next(epoch)
    out["host_syncs_per_batch"] = "none (set_sync_debug_mode error, 20 batches)"
except RuntimeError as error:
    out["host_syncs_per_batch"] = f"SYNC: {error}"[:200]
torch.cuda.set_sync_debug_mode(0)
source.set_epoch(1)
again = next(iter(source))
out["replay_equal"] = bool(torch.equal(first[0], again[0])
                           and torch.equal(first[1], again[1]))
torch.cuda.synchronize()
start, n = time.perf_counter(), 0
for _, labels in source:
    n += len(labels)
    if n >= 64 * 300:
        break
torch.cuda.synchronize()
out["data_path_train_images_per_second"] = n / (time.perf_counter() - start)
print(json.dumps(out, indent=1))
