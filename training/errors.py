"""How a run ends early, in one line printed by training.cli.command_line: a failure the
user can act on (RunError), or a stop (Terminated: SIGTERM; Ctrl-C: KeyboardInterrupt)."""
import signal
from contextlib import contextmanager

STOPS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and a scheduler's or `kill`'s stop


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
    for signum in STOPS:
        signal.signal(signum, signal.SIG_IGN)


@contextmanager
def stops_held():
    """A stop waits until the block ends, and comes then: while DataLoader forks its
    workers it would be lost, and the workers start holding it (until quiet_worker)."""
    heard = []
    handlers = {s: signal.signal(s, lambda s, _: heard.append(s)) for s in STOPS}
    hold(signal.SIG_BLOCK)
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        hold(signal.SIG_UNBLOCK)
        if heard:
            signal.raise_signal(heard[0])


def hold(how):  # the mask of stops held, which a new process inherits (POSIX)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(how, STOPS)
