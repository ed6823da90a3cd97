"""What bug.py and fixed.py share, so that the two hold only what differs and
`diff bug.py fixed.py` is the fix: the report's data and transforms, its model and its loops.
The scripts' image size, freezing, optimizer and hyper-parameters are used as given."""
from .cli import RunError, command_line, parse_args
from .data import cifar100
from .loop import run, train, validate
from .model import data_parallel, efficientnet_b0

__all__ = ["RunError", "command_line", "parse_args", "cifar100", "run", "train", "validate",
           "data_parallel", "efficientnet_b0"]
