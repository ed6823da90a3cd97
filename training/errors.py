"""The two ways a run ends early on purpose: a failure the user can act on (RunError), and a
stop signal (Terminated, for SIGTERM; Ctrl-C is Python's own KeyboardInterrupt). Both end in
one line, printed by the one handler, training.cli.command_line."""
import signal


class RunError(Exception):
    """A failure the user can act on: one line, no traceback. Exit status 1, or 2 for what
    the command line cannot ask."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`): it stops a run exactly as Ctrl-C does."""


class DiskFull(RunError):
    """A write that found no space left: nothing half-written stays behind."""


def ignore_stops():
    """Ignore Ctrl-C and SIGTERM from now on. Called once a run's outcome is saved or known:
    a stop could then only break the clean-up, where DataLoader's workers end (a __del__),
    with a traceback."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
