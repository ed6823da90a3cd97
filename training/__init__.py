"""What bug.py and fixed.py share, so that each holds only the report's own code: the
command line, the report's data and model, and the epochs around the scripts' own train()
and validate() (saving, resuming, reporting, failing in one line). --fast: fast.py."""
from .cli import command_line, parse_args
from .data import cifar100
from .errors import RunError
from .loop import run
from .model import data_parallel, efficientnet_b0

__all__ = ["RunError", "command_line", "parse_args", "cifar100", "run", "data_parallel",
           "efficientnet_b0"]
