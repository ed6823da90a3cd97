"""A run's files in --output-dir: NAME.json (the results), NAME.pth (the checkpoint) and
.NAME.lock (one writer). Every write goes to a temp file, to disk, then over the old file:
a crash at any instant leaves a complete file. The checkpoint, written first, holds the
whole history: the JSON is always a prefix of it, and a resume rebuilds the JSON."""
import errno
import io
import json
import os
from contextlib import contextmanager, suppress

import torch
from filelock import FileLock, Timeout

import schema

from .errors import DiskFull, RunError


@contextmanager
def sole_writer(args):
    """Hold the run's lock while the block runs, or refuse: two writers would splice two
    runs together. The lock is the kernel's: it goes with the process however it ends."""
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"--output-dir {args.output_dir}: cannot create it "
                       f"({error.strerror})") from None
    lock = FileLock(args.output_dir / f".{args.run_name}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunError(f"{args.results_path}: another run is writing it: stop that one "
                       "first, or pick another --run-name", status=2) from None
    except OSError as error:  # a folder in its place, another user's lock file
        raise RunError(f"cannot lock {lock.lock_file}: {error.strerror}",
                       status=2) from None
    try:
        # Again, now that no other run can write them: one may have ended since start-up.
        problem = files_problem(args)
        if problem:
            raise RunError(problem, status=2)
        for path in (args.results_path, args.checkpoint_path):  # what a killed write left
            path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def files_problem(args):
    """Why this run may not write its files as they are (at start-up, then locked)."""
    if args.resume and not args.checkpoint_path.exists():
        if args.results_path.exists():
            return (f"--resume: {args.results_path} has no checkpoint beside it to "
                    "resume from: --overwrite starts the run afresh")
        return f"--resume: no run {args.checkpoint_path} to resume: leave out --resume"
    existing = [p for p in (args.results_path, args.checkpoint_path) if p.exists()]
    if existing and not (args.resume or args.overwrite):
        return (f"{existing[0]} holds an earlier run: pass --resume to continue it, "
                "--overwrite to replace it, or --run-name to keep both")
    return None


def save_results(args, config, history, status):
    document = schema.record(schema.RESULTS, script=args.script, run_name=args.run_name,
                             status=status, config=config, epochs=history)
    atomic_write(args.results_path, json.dumps(document, indent=2).encode())


def save_checkpoint(args, model, optimizer, config, history):
    state = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": len(history), "config": config, "history": history}
    buffer = io.BytesIO()  # serialised first: a full disk is then a plain OSError below
    torch.save(state, buffer)
    atomic_write(args.checkpoint_path, buffer.getbuffer())


def load_checkpoint(args, config):
    try:
        state = torch.load(args.checkpoint_path, map_location="cpu", weights_only=True)
        saved, _ = state["config"], state["history"]  # a KeyError: not a checkpoint
    except Exception as error:  # truncated, corrupt or foreign: all mean "cannot resume"
        raise RunError(f"cannot resume: {args.checkpoint_path} is corrupt or not a "
                       f"checkpoint of this project ({type(error).__name__}); start "
                       "afresh with --overwrite") from None
    differ = [key for key in schema.RECIPE if saved.get(key) != config[key]]
    if differ:
        details = ", ".join(f"{key} {saved.get(key)!r} there, {config[key]!r} here"
                            for key in differ)
        raise RunError(f"cannot resume: {args.checkpoint_path} is another recipe "
                       f"({details}); use the same settings, or another --run-name")
    return state


def atomic_write(path, data):
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{path.parent} is full (no space left for {path.name}): free "
                           "some space") from None
        raise RunError(f"cannot write {path}: {error.strerror}") from None
    finally:  # a full disk, a signal: no partial file left behind (none after the rename)
        with suppress(OSError):  # a file system gone read-only: the write's error matters
            temp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
