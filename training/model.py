"""EfficientNet-b0 as the report builds it: ImageNet weights from efficientnet_pytorch,
wrapped in nn.DataParallel."""
from pathlib import Path

import torch
import torch.nn as nn
from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import url_map

from .errors import RunError

WEIGHTS_URL = url_map["efficientnet-b0"]
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]  # efficientnet-b0-355c32eb.pth


def efficientnet_b0(args):
    """EfficientNet-b0 with ImageNet weights (downloaded, or from --weights), or random
    (--no-pretrained). Seeds torch first: the script's new head is the same every run."""
    torch.manual_seed(args.seed)
    if args.no_pretrained:
        return EfficientNet.from_name("efficientnet-b0")
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    weights = args.weights and str(args.weights)
    try:
        return EfficientNet.from_pretrained("efficientnet-b0", weights_path=weights)
    except OSError as error:  # URLError is an OSError
        raise RunError(f"the ImageNet weights could not be downloaded ({error}). "
                       f"Download {WEIGHTS_FILE} from {WEIGHTS_URL} into {hub}/ or pass "
                       "--weights PATH; or use --no-pretrained") from None
    except Exception as error:  # a truncated copy in the hub's cache
        raise RunError(f"{hub / WEIGHTS_FILE} is corrupt ({type(error).__name__}): "
                       "delete it to download it again, or pass --weights PATH") from None


def weights_problem(path):
    """Why `path` is not EfficientNet-b0's state dict in the published layout, or None."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:  # no such file, a directory
        return f"cannot be read ({error.strerror})"
    except Exception as error:  # any unreadable file: the message is what matters
        return f"not a PyTorch state dict ({type(error).__name__})"
    try:
        EfficientNet.from_name("efficientnet-b0").load_state_dict(state)
    except Exception as error:  # line 1 names the model, line 2 the first problem
        first_problem = str(error).splitlines()[1:2] or [str(error)]
        return f"not EfficientNet-b0's weights ({first_problem[0].strip()[:160]})"
    return None


def data_parallel(model, device):
    """nn.DataParallel, as the report has it (`.module`), on the one selected device."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # where the loader pins memory; nothing on GPU 0
        return nn.DataParallel(model, device_ids=[device.index or 0])
    parallel = nn.DataParallel(model)  # without CUDA, a plain wrapper
    if parallel.device_ids:  # a GPU host, yet --device cpu: keep the model on the CPU
        parallel.device_ids = []  # forward() then calls the module directly
        parallel.module.to(device)
    return parallel


def count_params(model, optimizer):
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return dict(total_params=sum(p.numel() for p in model.parameters()),
                trainable_params=sum(p.numel() for p in trainable),
                updated_params=sum(p.numel() for p in trainable if id(p) in held))
