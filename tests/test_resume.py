"""Resuming, interrupting and crashing a run, end to end: the tests start fixed.py (or
bug.py) as a user would, in a subprocess, on a tiny CPU run (conftest.TINY); only the
unexpected error is injected in-process, where the loss function can be replaced.

What is checked: a resumed run ends bit-identical to an uninterrupted one; a SIGKILL at any
moment (mid-write included) leaves only complete files, from which --resume finishes the
run; SIGINT/SIGTERM stop cleanly with a working resume command, and a second process
refuses the run's files while it goes on, or when both start together; every refusal to resume is one line and touches
nothing, and the recipe check covers exactly the recipe's settings; a non-finite loss
stops the run keeping its finished epochs, and so does an unexpected error.

Each process spends ~3 s importing torch, so independent runs go two at a time (one thread
each: OMP_NUM_THREADS=1 for every run here, so all runs share the same numerics)."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import training
from conftest import REPO, TINY, hold_run_lock, run_script

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMING_KEYS = {"epoch_seconds", "train_images_per_second", "warmup_seconds"}
PARALLEL = 2  # runs at a time: one per core


# --------------------------------------------------------------------------- helpers

def with_arg(argv, flag, value):
    """argv with `flag value` set: replaced where present, appended otherwise."""
    argv = list(map(str, argv))
    if flag in argv:
        argv[argv.index(flag) + 1] = str(value)
        return argv
    return [*argv, flag, str(value)]


def tiny(out, *extra):
    return [*TINY, "--output-dir", str(out), *map(str, extra)]


def run(*args, script="fixed.py", cwd=REPO):
    return run_script(script, *args, cwd=cwd, env=ENV, timeout=300)


def in_parallel(jobs):
    """Run the callables two at a time; returns {name: (result, exception)}."""
    def attempt(job):
        try:
            return job(), None
        except BaseException as error:  # re-raised in the test that owns the job
            return None, error
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(attempt, job) for name, job in jobs.items()}
    return {name: future.result() for name, future in futures.items()}


def outcome(results, name):
    result, error = results[name]
    if error is not None:
        raise error
    return result


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_error_line(proc, code):
    """Exit `code`, one stderr line saying "error:", no traceback; returns that line."""
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def untimed(history):
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in history]


def assert_same(a, b, where="state"):
    """Tensors equal bit for bit (torch.equal) and of one dtype, everything else ==,
    through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{where} differs"  # (a precomputed flag: no tensor dumps in the report)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training(a, b):
    """Two checkpoints hold the same weights, optimizer state and (timing aside) history."""
    assert_same(a["model"], b["model"], "model")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")
    assert a["epoch"] == b["epoch"]
    assert untimed(a["history"]) == untimed(b["history"])


def is_temp(name):
    return name.startswith(".") and name.endswith(".tmp")


def temps(out):
    return sorted(p.name for p in out.iterdir() if is_temp(p.name)) if out.exists() else []


def snapshot(out):
    """{name: bytes} of every file in `out`."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()} if out.exists() else {}


def complete_files(out, name="fixed"):
    """Checks that every non-temp file in `out` is complete, and that the JSON's epochs are a
    prefix of the checkpoint's history (the checkpoint is written first). Returns
    (results document or None, checkpoint or None)."""
    document = checkpoint = None
    for path in sorted(out.iterdir()) if out.exists() else []:
        if is_temp(path.name) or path.name == f".{name}.lock":
            continue
        assert path.name in (f"{name}.json", f"{name}.pth"), f"unexpected file {path.name}"
        if path.suffix == ".json":
            document = json.loads(path.read_text())
            assert {"script", "config", "epochs", "status"} <= document.keys(), document.keys()
            assert [e["epoch"] for e in document["epochs"]] == list(range(1, len(document["epochs"]) + 1))
        else:
            checkpoint = load_checkpoint(path)
            assert {"model", "optimizer", "epoch", "history", "config"} <= checkpoint.keys()
            assert checkpoint["epoch"] == len(checkpoint["history"])
            assert len(checkpoint["model"]) > 0 and "state" in checkpoint["optimizer"]
    if document is not None:
        assert checkpoint is not None, "a results JSON without a checkpoint"
        assert document["epochs"] == checkpoint["history"][:len(document["epochs"])], \
            "the JSON is not a prefix of the checkpoint's history"
    return document, checkpoint


def assert_finished(out, epochs):
    document = json.loads((out / "fixed.json").read_text())
    checkpoint = load_checkpoint(out / "fixed.pth")
    assert document["status"] == "finished"
    assert [e["epoch"] for e in document["epochs"]] == list(range(1, epochs + 1))
    assert checkpoint["epoch"] == epochs
    assert document["epochs"] == checkpoint["history"]
    assert temps(out) == []
    return document, checkpoint


# --------------------------------------------------------------------------- 1. resume equivalence

@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """2 epochs straight vs 1 epoch then --resume --epochs 2, with --workers 0 and 2."""
    root = tmp_path_factory.mktemp("equivalence")
    w2 = ["--workers", "2"]

    def leg(name, *extra):
        return lambda: ok(run(*tiny(root / name, *extra)))
    first = in_parallel({
        "straight": leg("straight", "--epochs", "2"),
        "half": leg("half", "--epochs", "1"),
        "straight_w2": leg("straight_w2", "--epochs", "2", *w2),
        "half_w2": leg("half_w2", "--epochs", "1", *w2),
    })
    for name in first:
        outcome(first, name)
    shutil.copytree(root / "half", root / "half_then_w2")
    second = in_parallel({
        "resumed": leg("half", "--epochs", "2", "--resume"),
        "resumed_leg_w2": leg("half_then_w2", "--epochs", "2", "--resume", *w2),
        "resumed_w2": leg("half_w2", "--epochs", "2", "--resume", *w2),
    })
    return root, second


def test_resume_is_identical_to_an_uninterrupted_run(equivalence):
    root, runs = equivalence
    outcome(runs, "resumed")
    straight = assert_finished(root / "straight", 2)
    resumed = assert_finished(root / "half", 2)
    assert_same_training(straight[1], resumed[1])
    assert untimed(straight[0]["epochs"]) == untimed(resumed[0]["epochs"])


def test_resumed_leg_with_workers_is_identical(equivalence):
    """The design claims results do not depend on --workers: the second epoch run with two
    loader processes ends where the all-in-one-process run does."""
    root, runs = equivalence
    outcome(runs, "resumed_leg_w2")
    straight = load_checkpoint(root / "straight" / "fixed.pth")
    _, resumed = assert_finished(root / "half_then_w2", 2)
    assert_same_training(straight, resumed)


def test_workers_do_not_change_the_results(equivalence):
    """2 epochs straight with --workers 2 == 2 epochs straight with --workers 0."""
    root, _ = equivalence
    assert_same_training(load_checkpoint(root / "straight" / "fixed.pth"),
                         load_checkpoint(root / "straight_w2" / "fixed.pth"))


def test_resume_with_workers_is_identical(equivalence):
    """The everyday case (the default --workers is one per CPU): interrupted and resumed
    with the same --workers 2, the run ends where the uninterrupted --workers 2 run does."""
    root, runs = equivalence
    outcome(runs, "resumed_w2")
    assert_same_training(load_checkpoint(root / "straight_w2" / "fixed.pth"),
                         load_checkpoint(root / "half_w2" / "fixed.pth"))


# --------------------------------------------------------------------------- 2. SIGKILL at any moment

FAULT_ARGS = ["--epochs", "3"]

# Kill fixed.py from inside at an exact write step: os.replace is patched (in the killed
# process only; nothing in the project changes) to SIGKILL the process just before or just
# after its N-th call. A fresh 3-epoch run makes nine atomic writes: 1 checkpoint (epoch 0),
# 2 JSON, then per epoch e: 2e+1 checkpoint, 2e+2 JSON, and 9 the final "finished" JSON.
KILL_AT_REPLACE = r"""
import os, runpy, signal, sys
when, n = sys.argv[1], int(sys.argv[2])
del sys.argv[:3]  # now [script, args...], as if the script had been run directly
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
real_replace, calls = os.replace, [0]
def replace(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real_replace(*args, **kwargs)
    if calls[0] == n and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
os.replace = replace
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def kill_at_write(when, n):
    def start(argv, log):
        return subprocess.Popen([sys.executable, "-c", KILL_AT_REPLACE, when, str(n),
                                 str(REPO / "fixed.py"), *argv], cwd=REPO, env=ENV,
                                stdout=log, stderr=subprocess.STDOUT)
    return start


def kill_from_outside(trigger):
    """SIGKILL sent from here once trigger(out, seconds since start) is true (polled every
    millisecond)."""
    def start(argv, log):
        out = Path(argv[argv.index("--output-dir") + 1])
        proc = subprocess.Popen([sys.executable, str(REPO / "fixed.py"), *argv], cwd=REPO,
                                env=ENV, stdout=log, stderr=subprocess.STDOUT)
        began = time.monotonic()
        while proc.poll() is None:
            if trigger(out, time.monotonic() - began):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        return proc
    return start


def after_seconds(seconds):
    return lambda out, elapsed: elapsed >= seconds


def while_writing_epoch_checkpoint(out, elapsed):
    """A checkpoint after the first is being written: its temp file is partly there."""
    temp = out / ".fixed.pth.tmp"
    try:
        return (out / "fixed.pth").exists() and temp.stat().st_size > 0
    except FileNotFoundError:
        return False


def results_epochs(out):
    try:
        return len(json.loads((out / "fixed.json").read_text())["epochs"])
    except FileNotFoundError:
        return -1


class DuringEpoch2:
    """0.1 s after the JSON first shows epoch 1 finished."""

    def __init__(self):
        self.seen = None

    def __call__(self, out, elapsed):
        if self.seen is None and results_epochs(out) >= 1:
            self.seen = elapsed
        return self.seen is not None and elapsed >= self.seen + 0.1


# name: (how the run is killed, (checkpoint epoch, JSON epochs, temp files) expected right
# after the kill, or None where the moment is not exact)
FAULTS = {
    "importing": (kill_from_outside(after_seconds(0.5)), (None, None, [])),
    "first_checkpoint_written_not_renamed": (kill_at_write("before", 1), (None, None, [".fixed.pth.tmp"])),
    "first_checkpoint_renamed_no_json": (kill_at_write("after", 1), (0, None, [])),
    "mid_checkpoint_write": (kill_from_outside(while_writing_epoch_checkpoint), None),
    "epoch1_checkpoint_renamed_json_behind": (kill_at_write("after", 3), (1, 0, [])),
    "epoch1_json_written_not_renamed": (kill_at_write("before", 4), (1, 0, [".fixed.json.tmp"])),
    "mid_epoch_2": (kill_from_outside(DuringEpoch2()), None),
    "epoch3_checkpoint_written_not_renamed": (kill_at_write("before", 7), (2, 2, [".fixed.pth.tmp"])),
    "final_json_written_not_renamed": (kill_at_write("before", 9), (3, 3, [".fixed.json.tmp"])),
}


def fault_scenario(root, name):
    start, expected = FAULTS[name]
    out = root / name
    argv = tiny(out, *FAULT_ARGS)
    with open(root / f"{name}.log", "wb") as log:
        proc = start(argv, log)
        proc.wait(timeout=300)
    killed = dict(returncode=proc.returncode, temps=temps(out))
    assert proc.returncode == -signal.SIGKILL, \
        f"{name}: not killed (exit {proc.returncode}): {(root / f'{name}.log').read_text()[-3000:]}"
    document, checkpoint = complete_files(out)
    killed.update(checkpoint_epoch=checkpoint and checkpoint["epoch"],
                  json_epochs=document and len(document["epochs"]))
    if expected is not None:
        assert (killed["checkpoint_epoch"], killed["json_epochs"], killed["temps"]) == expected

    before = snapshot(out)
    resumed = run(*argv, "--resume")
    if checkpoint is None:
        line = one_error_line(resumed, 2)
        assert "no checkpoint" in line and "without --resume" in line
        assert snapshot(out) == before, "a refused --resume changed the output folder"
        ok(run(*argv, *(["--overwrite"] if document is not None else [])))
    else:
        ok(resumed)
    return killed


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return root, in_parallel({name: (lambda name=name: fault_scenario(root, name)) for name in FAULTS})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 3-epoch run never killed: SimpleNamespace(dir, document, checkpoint)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    ok(run(*tiny(out, *FAULT_ARGS)))
    document, checkpoint = assert_finished(out, 3)
    return SimpleNamespace(dir=out, document=document, checkpoint=checkpoint)


@pytest.mark.parametrize("moment", FAULTS)
def test_sigkill_leaves_complete_files_and_resume_finishes_the_run(uninterrupted, faults, moment):
    """After the kill every file is complete (the JSON a prefix of the checkpoint); --resume
    (or, before any checkpoint, a plain rerun) finishes with epochs 1..3, no temp file left,
    and the very weights, optimizer state and history of a run never killed."""
    root, results = faults
    print(moment, "left", outcome(results, moment))  # shown when the test fails
    document, checkpoint = assert_finished(root / moment, 3)
    assert_same_training(uninterrupted.checkpoint, checkpoint)
    assert untimed(document["epochs"]) == untimed(uninterrupted.document["epochs"])


# --------------------------------------------------------------------------- 3. SIGINT and SIGTERM

SIGNAL_ARGS = ["--epochs", "50", "--limit-train-batches", "20"]


def start_run(argv, log_dir, **popen):
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = open(log_dir / "stdout", "w"), open(log_dir / "stderr", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "fixed.py"), *argv], cwd=REPO, env=ENV,
                            stdout=stdout, stderr=stderr, **popen)
    stdout.close()
    stderr.close()
    return proc


def wait_for_epochs(out, proc, log_dir, epochs=1, timeout=180):
    """Poll the results JSON (atomic writes: it must parse whenever it exists) until it
    holds `epochs` finished epochs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early (exit {proc.returncode}): "
                        f"{(log_dir / 'stderr').read_text()[-3000:]}")
        if results_epochs(out) >= epochs:
            return
        time.sleep(0.05)
    pytest.fail("no epoch finished in time")


def stop_with(proc, send):
    began = time.monotonic()
    send()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not stop within 60 s of the signal")
    return time.monotonic() - began


def assert_interrupted(out, log_dir, proc, code, seconds):
    stderr = (log_dir / "stderr").read_text()
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{stderr[-2000:]}"
    assert seconds < 10, f"took {seconds:.1f} s to stop"
    assert "Traceback" not in stderr, stderr[-2000:]
    assert "Resume with:" in stderr, stderr[-2000:]
    document, checkpoint = complete_files(out)
    assert document["status"] == "interrupted"
    assert len(document["epochs"]) >= 1
    assert checkpoint["epoch"] == len(document["epochs"])
    assert document["epochs"] == checkpoint["history"]
    assert temps(out) == []
    command = stderr.split("Resume with:", 1)[1].strip().splitlines()[0].strip()
    return document, command


def interrupt_a_run(tmp_path, signum, code, second_writer):
    """Start a run; once an epoch has finished, check that a second process given
    `second_writer` (--resume or --overwrite) refuses to write the same files; send `signum`,
    check what the run leaves; return the results document and the resume command it printed."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = start_run(tiny(out, *SIGNAL_ARGS), logs)
    try:
        wait_for_epochs(out, proc, logs)
        line = one_error_line(run(*tiny(out, *SIGNAL_ARGS), second_writer), 2)
        assert f"still writing it (process {proc.pid})" in line, line
        assert proc.poll() is None, "the run ended before the second process was refused"
        seconds = stop_with(proc, lambda: proc.send_signal(signum))
    finally:
        if proc.poll() is None:
            proc.kill()
    return assert_interrupted(out, logs, proc, code, seconds)


def test_sigint_stops_cleanly_and_the_printed_command_resumes(tmp_path):
    document, command = interrupt_a_run(tmp_path, signal.SIGINT, 130, "--overwrite")
    assert command.startswith("python ") and "--resume" in command, command

    finished = len(document["epochs"])
    argv = shlex.split(command)
    argv = with_arg([sys.executable, *argv[1:]], "--epochs", finished + 1)
    resumed = ok(subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True,
                                timeout=300))
    assert "done:" in resumed.stdout
    assert_finished(tmp_path / "out", finished + 1)


def test_sigterm_stops_cleanly(tmp_path):
    _, command = interrupt_a_run(tmp_path, signal.SIGTERM, 143, "--resume")
    assert "--resume" in command


def test_the_resume_command_of_an_overwriting_run(monkeypatch):
    """Ctrl-C in a run started with --overwrite: the command printed resumes it, without
    --overwrite (which --resume refuses, and which would start it again)."""
    monkeypatch.setattr(sys, "argv", ["fixed.py", "--overwrite", "--epochs", "3"])
    assert training.resume_command() == "python fixed.py --epochs 3 --resume"
    monkeypatch.setattr(sys, "argv", ["fixed.py", "--resume"])
    assert training.resume_command() == "python fixed.py --resume"


def test_a_signal_before_training_is_one_line_and_its_exit_code(tmp_path, capsys):
    """From the command line on (start-up may include a download), SIGINT and SIGTERM stop
    with one line and 130/143, not a KeyboardInterrupt traceback or a silent SIGTERM death."""
    saved = {signum: signal.getsignal(signum) for signum in training.EXIT_SIGNAL}
    try:
        training.parse_args("fixed.py", "", epochs=1, batch_size=4, lr=0.005, image_size=32,
                            argv=["--dummy", "--device", "cpu", "--output-dir", str(tmp_path)])
        for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            handler = signal.getsignal(signum)
            # checked first: Python's own SIGINT handler would stop this whole test session
            assert handler is training.exit_before_training
            with pytest.raises(SystemExit) as exit_:
                handler(signum, None)
            assert exit_.value.code == code
        assert capsys.readouterr().err.count("stopped before training started") == 2
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_whole_process_group_with_workers(tmp_path, signum):
    """Ctrl-C in a terminal (SIGINT), or a job manager stopping the job's process group
    (SIGTERM: systemd, Slurm, `kill -- -PGID`), reaches the loader's workers too: the run
    must still stop cleanly, without tracebacks, and leave no process behind."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = start_run(tiny(out, *SIGNAL_ARGS, "--workers", "2"), logs, start_new_session=True)
    group = proc.pid
    try:
        wait_for_epochs(out, proc, logs)
        seconds = stop_with(proc, lambda: os.killpg(group, signum))
        assert_interrupted(out, logs, proc, {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], seconds)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("loader workers outlived the run")
    finally:
        try:
            os.killpg(group, signal.SIGKILL)  # only this test's own session
        except ProcessLookupError:
            pass


def test_a_running_run_is_told_from_a_killed_one(tmp_path):
    """A run's lock names its process while that process lives, and goes with it, however
    it ends (here SIGKILL), though the file stays. Probing creates and holds nothing."""
    lock = tmp_path / ".fixed.lock"
    assert training.lock_holder(lock) is None and not lock.exists()
    args = SimpleNamespace(lock_path=lock, results_path=tmp_path / "fixed.json")
    holder = hold_run_lock(lock)
    try:
        assert training.lock_holder(lock) == str(holder.pid)
        with pytest.raises(SystemExit) as refused:  # a second writer
            training.take_run_lock(args)
        assert f"still writing it (process {holder.pid})" in str(refused.value.code)
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists() and training.lock_holder(lock) is None
    os.close(training.take_run_lock(args))  # now free: this process takes it
    assert lock.read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("what", ["plain", "resume"])
def test_files_written_while_a_run_starts_are_checked_again_under_its_lock(build, tmp_path,
                                                                           monkeypatch, what):
    """A run checks the output folder on its command line, loads data and model (and, with
    --resume, the checkpoint), then takes the lock. Another run may have written the folder
    in between, and ended: under the lock the checks are made again, so a plain run still
    never replaces an earlier run, and --resume never goes on from an older checkpoint
    than the one on disk."""
    out = tmp_path / "out"
    if what == "resume":
        ok(run(*tiny(out, "--epochs", "1")))
    built = build("fixed.py", *tiny(out, "--epochs", "2",
                                    *(["--resume"] if what == "resume" else [])))
    if what == "plain":  # another run, ended meanwhile
        out.mkdir()
        (out / "fixed.json").write_text("{}")
        message = "holds an earlier run"
    else:  # another --resume wrote its next epoch just after this one loaded the checkpoint
        load_checkpoint = training.load_checkpoint

        def load_then_another_run_writes(args, config):
            state = load_checkpoint(args, config)
            stat = args.checkpoint_path.stat()
            os.utime(args.checkpoint_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**6))
            return state

        monkeypatch.setattr(training, "load_checkpoint", load_then_another_run_writes)
        message = "changed while this run started: run it again"
    before = {name: data for name, data in snapshot(out).items() if name != ".fixed.lock"}
    with pytest.raises(SystemExit) as refused:
        training.run(built.args, built.model, built.criterion, built.optimizer,
                     built.train_set, built.test_set)
    assert message in str(refused.value.code), refused.value.code
    assert {name: data for name, data in snapshot(out).items() if name != ".fixed.lock"} == before


def test_two_runs_started_together_one_writes_the_other_is_refused(tmp_path):
    """Started at the same moment, both runs pass the command line's check (no lock is
    held yet); the lock taken before the first write lets only one of them on. (Without
    it, both wrote the same temp files, and one died mid-rename with a traceback.)"""
    out = tmp_path / "out"
    argv = tiny(out, "--epochs", "8")  # a few seconds of training: the two overlap
    procs = [start_run(argv, tmp_path / f"logs{i}") for i in (0, 1)]
    for proc in procs:
        proc.wait(timeout=300)
    codes = sorted(proc.returncode for proc in procs)
    stderrs = [(tmp_path / f"logs{i}" / "stderr").read_text() for i in (0, 1)]
    assert codes[0] == 0 and codes[1] in (1, 2), (codes, stderrs)
    refused = stderrs[[proc.returncode for proc in procs].index(codes[1])]
    winner = procs[[proc.returncode for proc in procs].index(0)]
    assert "Traceback" not in refused, refused
    lines = [line for line in refused.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"still writing it (process {winner.pid})" in lines[0], refused
    document, checkpoint = complete_files(out)
    assert document["status"] == "finished" and len(document["epochs"]) == 8
    assert checkpoint["history"] == document["epochs"]


# --------------------------------------------------------------------------- 4. refusals

def fake_imagenet_weights(path):
    """A file in the layout of the published b0 weights (random values): lets a run be
    "pretrained" without the network."""
    from efficientnet_pytorch import EfficientNet
    torch.manual_seed(0)
    torch.save(EfficientNet.from_name("efficientnet-b0").state_dict(), path)
    return path


def copy_run(source, out, *names):
    out.mkdir()
    for name in names:
        shutil.copy(source / name, out / name)


def keep(source, out, weights):
    copy_run(source, out, "fixed.json", "fixed.pth")


def only_json(source, out, weights):
    copy_run(source, out, "fixed.json")


def only_checkpoint(source, out, weights):
    copy_run(source, out, "fixed.pth")


def damaged(damage):
    def prepare(source, out, weights):
        keep(source, out, weights)
        (out / "fixed.pth").write_bytes(damage((out / "fixed.pth").read_bytes()))
    return prepare


def inconsistent(source, out, weights):
    only_json(source, out, weights)
    state = load_checkpoint(source / "fixed.pth")
    state["epoch"] = 2  # three epochs of history
    torch.save(state, out / "fixed.pth")


RESUME = [*FAULT_ARGS, "--resume"]
WEIGHTS = "WEIGHTS"  # replaced by the path of fake_imagenet_weights()
# name: (prepare(source, out, weights), script, arguments after TINY (--no-pretrained removed
# where named), exit code, words the error line must hold). `source` is a finished 3-epoch run.
REFUSALS = {
    "no_checkpoint": (only_json, "fixed.py", RESUME, 2, ["no checkpoint"]),
    # trained epochs in a checkpoint whose JSON is gone: a plain rerun must not replace them
    "checkpoint_without_resume": (only_checkpoint, "fixed.py", FAULT_ARGS, 2,
                                  ["fixed.pth holds an earlier run", "--resume", "--overwrite"]),
    "resume_and_overwrite": (keep, "fixed.py", [*RESUME, "--overwrite"], 2, ["--resume", "--overwrite"]),
    "corrupt": (damaged(lambda data: np.random.default_rng(0).bytes(1 << 20)), "fixed.py", RESUME, 1,
                ["cannot resume", "corrupt"]),
    "truncated": (damaged(lambda data: data[:len(data) // 2]), "fixed.py", RESUME, 1,
                  ["cannot resume", "corrupt"]),
    "inconsistent": (inconsistent, "fixed.py", RESUME, 1, ["cannot resume", "inconsistent"]),
    # every recipe setting changed at once (one run: each costs seconds of imports); the
    # error must name each. --weights in place of --no-pretrained: "pretrained" differs.
    "recipe": (keep, "fixed.py", [*RESUME, "--lr", "0.001", "--batch-size", "8", "--image-size", "64",
                                  "--seed", "1", "--limit-train-batches", "3",
                                  "--limit-eval-batches", "2", "--fast", "--weights", WEIGHTS], 1,
               ["another recipe", "lr 0.005 there, 0.001 here", "batch_size 4 there, 8 here",
                "image_size 32 there, 64 here", "seed 0 there, 1 here",
                "limit_train_batches 2 there, 3 here", "limit_eval_batches 1 there, 2 here",
                "fast False there, True here", "pretrained 'none' there, 'imagenet' here"]),
    # bug.py resuming fixed.py's checkpoint, at fixed.py's lr so that only the script differs
    "script": (keep, "bug.py", [*RESUME, "--run-name", "fixed", "--lr", "0.005"], 1,
               ["another recipe", "script"]),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, uninterrupted):
    root = tmp_path_factory.mktemp("refusals")
    weights = fake_imagenet_weights(root / "imagenet-layout.pth")

    def attempt(name):
        prepare, script, extra, _, _ = REFUSALS[name]
        out = root / name
        prepare(uninterrupted.dir, out, weights)
        argv = [*TINY, "--output-dir", out, *[weights if a == WEIGHTS else a for a in extra]]
        if WEIGHTS in extra:
            argv = [a for a in argv if a != "--no-pretrained"]
        before = snapshot(out)
        proc = run(*argv, script=script)
        return proc, before, snapshot(out)
    return in_parallel({name: (lambda name=name: attempt(name)) for name in REFUSALS})


@pytest.mark.parametrize("case", REFUSALS)
def test_refusal_is_one_line_and_touches_nothing(refusals, case):
    *_, code, words = REFUSALS[case]
    proc, before, after = outcome(refusals, case)
    line = one_error_line(proc, code)
    for word in words:
        assert word in line, line
    assert before, "nothing to compare"
    assert after == before, "a refused run changed the output folder"


# Written out here, not read from training.RECIPE_KEYS: a key dropped there must fail here.
# Each value differs from RECIPE_CONFIG's.
MUST_MATCH = dict(script="bug", image_size=64, batch_size=8, lr=0.01, optimizer="SGD",
                  pretrained="imagenet", dummy=False, fast=True, seed=1, limit_train_batches=3,
                  limit_eval_batches=2)
MAY_CHANGE = dict(epochs=99, device="NVIDIA H100 80GB HBM3", workers=15, torch="2.99.0",
                  weights="elsewhere/efficientnet-b0-355c32eb.pth")
RECIPE_CONFIG = dict(script="fixed", image_size=32, batch_size=4, lr=0.005, optimizer="Adam",
                     pretrained="none", dummy=True, fast=False, seed=0, limit_train_batches=2,
                     limit_eval_batches=1, epochs=3, device="cpu", workers=0, torch="2.14.1",
                     weights=None)


@pytest.mark.parametrize("key", [*MUST_MATCH, *MAY_CHANGE])
def test_resume_checks_every_recipe_setting_and_only_those(tmp_path, key):
    args = SimpleNamespace(checkpoint_path=tmp_path / "fixed.pth")
    torch.save(dict(epoch=0, history=[], config=RECIPE_CONFIG), args.checkpoint_path)
    changed = {**RECIPE_CONFIG, key: {**MUST_MATCH, **MAY_CHANGE}[key]}
    if key in MAY_CHANGE:
        assert training.load_checkpoint(args, changed)["epoch"] == 0
        return
    with pytest.raises(SystemExit) as refused:
        training.load_checkpoint(args, changed)
    assert "another recipe" in str(refused.value) and f"({key} " in str(refused.value)


def test_a_second_signal_quits_at_once(monkeypatch):
    """The first Ctrl-C asks for a stop at the next batch; a second one, during a long step,
    quits at once (every file on disk is complete at any instant)."""
    exits = []
    monkeypatch.setattr(training.os, "_exit", exits.append)
    stop = training.StopFlag()
    stop.handle(signal.SIGINT, None)
    assert exits == []
    with pytest.raises(training.Interrupted):
        stop.check()
    stop.handle(signal.SIGINT, None)
    assert exits == [130]


# --------------------------------------------------------------------------- 5. non-finite loss

# Found by trying: with this lr, epoch 1 of the TINY run finishes and epoch 2 overflows.
NONFINITE_LR = "0.5"


def test_non_finite_loss_stops_keeping_finished_epochs(tmp_path):
    out = tmp_path / "out"
    proc = run(*tiny(out, "--epochs", "3", "--lr", NONFINITE_LR))
    line = one_error_line(proc, 1)
    where = re.search(r"epoch (\d+) (training|test), batch (\d+)", line)
    assert where and "NaN or infinite" in line, line
    failed_epoch = int(where[1])
    assert failed_epoch >= 2, f"lr {NONFINITE_LR} now fails in epoch 1: pick a lower one ({line})"
    document, checkpoint = complete_files(out)
    assert document["status"] == "failed"
    assert [e["epoch"] for e in document["epochs"]] == list(range(1, failed_epoch))
    assert checkpoint["epoch"] == failed_epoch - 1
    assert document["epochs"] == checkpoint["history"]
    assert temps(out) == []


def test_unexpected_error_marks_the_run_failed_and_it_resumes(build, tmp_path):
    """An exception nobody planned for (here, raised by the loss in epoch 2) still leaves
    results that say "failed" rather than "running", keeps epoch 1, and goes up with its
    traceback; --resume then finishes the run from epoch 1's checkpoint."""
    out = tmp_path / "out"
    built = build("fixed.py", *tiny(out, "--epochs", "3"))
    criterion = built.criterion

    def loss_that_breaks_in_epoch_2(output, labels):
        if json.loads(built.args.results_path.read_text())["epochs"]:
            raise RuntimeError("an unexpected failure")
        return criterion(output, labels)

    with pytest.raises(RuntimeError, match="an unexpected failure"):
        training.run(built.args, built.model, loss_that_breaks_in_epoch_2, built.optimizer,
                     built.train_set, built.test_set)
    document, checkpoint = complete_files(out)
    assert document["status"] == "failed"
    assert [e["epoch"] for e in document["epochs"]] == [1] and checkpoint["epoch"] == 1

    ok(run(*tiny(out, "--epochs", "3", "--resume")))
    assert_finished(out, 3)


def test_out_of_gpu_memory_is_one_line_and_marks_the_run_failed(build, tmp_path, monkeypatch):
    """The bug's recipe on a smaller GPU: one line that says what to change (exit 1), the
    results "failed" with the finished epochs kept. (No GPU here: the error is raised.)"""
    out = tmp_path / "out"
    built = build("fixed.py", *tiny(out, "--epochs", "2"))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "train_step", out_of_memory)
    with pytest.raises(SystemExit) as stopped:
        training.run(built.args, built.model, built.criterion, built.optimizer,
                     built.train_set, built.test_set)
    message = str(stopped.value.code)
    assert "error: out of GPU memory in epoch 1 (cpu)" in message, message
    assert "--batch-size" in message and "\n" not in message
    document, checkpoint = complete_files(out)
    assert document["status"] == "failed" and document["epochs"] == []
    assert checkpoint["epoch"] == 0


# --------------------------------------------------------------------------- 6. nothing left to do

def test_resume_of_a_finished_run_rebuilds_the_results(tmp_path, uninterrupted):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(uninterrupted.dir / "fixed.pth", out / "fixed.pth")
    checkpoint_bytes = (out / "fixed.pth").read_bytes()
    proc = ok(run(*tiny(out, *FAULT_ARGS, "--resume")))
    assert "already holds 3 epochs" in proc.stdout
    document, checkpoint = assert_finished(out, 3)
    assert document["epochs"] == uninterrupted.checkpoint["history"]
    assert (out / "fixed.pth").read_bytes() == checkpoint_bytes


def test_resume_with_nothing_to_do_leaves_no_temp_file(tmp_path, uninterrupted):
    """A kill during a checkpoint write leaves .fixed.pth.tmp behind; resuming a run that
    holds 3 epochs with --epochs 2 (there is nothing to train) must not leave the stale
    temp file either, and the results say 3 epochs of 3, not of 2."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(uninterrupted.dir / "fixed.pth", out / "fixed.pth")
    (out / ".fixed.pth.tmp").write_bytes(b"\0" * 1000)  # what an interrupted write leaves
    proc = ok(run(*tiny(out, "--epochs", "2", "--resume")))
    assert "already holds 3 epochs" in proc.stdout
    assert temps(out) == []
    document, _ = assert_finished(out, 3)
    assert document["config"]["epochs"] == 3


def test_overwrite_never_leaves_the_old_json_beside_the_new_checkpoint(tmp_path, uninterrupted):
    """--overwrite of a finished run, killed right after its epoch-0 checkpoint replaced
    the old one: the old run's JSON (3 epochs) must be gone, not left beside a checkpoint of
    another run."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted.dir, out)
    with open(tmp_path / "killed.log", "wb") as log:
        proc = kill_at_write("after", 1)(tiny(out, *FAULT_ARGS, "--overwrite"), log)
        proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    document, checkpoint = complete_files(out)
    assert (document, checkpoint["epoch"]) == (None, 0)
