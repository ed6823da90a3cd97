"""What bug.py and fixed.py share, so that the two hold only the report's own code and
`diff bug.py fixed.py` is the fix: the command line, the report's data and transforms, its
model, and the epochs around the scripts' own train() and validate() (saving, resuming,
reporting, failing in one line). --fast lives in fast.py alone."""
from .cli import command_line, parse_args
from .data import cifar100
from .errors import RunError
from .loop import run
from .model import data_parallel, efficientnet_b0

__all__ = ["RunError", "command_line", "parse_args", "cifar100", "run", "data_parallel",
           "efficientnet_b0"]
