"""How a run ends early, in one line printed by training.cli.command_line: a failure the
user can act on (RunError), or a stop (Terminated: SIGTERM; Ctrl-C: KeyboardInterrupt)."""
import signal


class RunError(Exception):
    """A failure the user can act on: one line; exit status 1 (2: a refused command)."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`): it stops a run exactly as Ctrl-C does."""


class DiskFull(RunError):
    """A write that found no space left: nothing half-written stays behind."""


def ignore_stops():
    """Once a run's outcome is saved or known, a stop could only break the clean-up (the
    workers end in a DataLoader's __del__) with a traceback: ignore it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
