"""Stopping, resuming and failing a run, end to end, on conftest.TINY's CPU run.
Fixture `runs` starts its runs two at a time in the background; refusals run
__main__ in this process."""
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
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import schema
import training
from conftest import (
    ENV,
    REPO,
    SMALL,
    TINY,
    build,
    one_error_line,
    run_here,
    run_script,
    train_for_real,
)

FIXED, EPOCHS = [sys.executable, str(REPO / "fixed.py")], ["--epochs", "3"]
TIMING = {"epoch_seconds", "train_images_per_second", "warmup_seconds"}
# runs until stopped
LONG = ["--epochs", "100", "--limit-train-batches", "5", "--workers", "2"]
# Found by trying: the test loss is ~1e32 after epoch 1 and overflows in epoch 2.
NON_FINITE = ["--limit-train-batches", "1", "--lr", "0.6"]
# Every recipe key a command line can change: the change, its value there (TINY) and here.
# Not here: script (the bug.py case), optimizer (per script), dummy (real CIFAR-100).
RECIPE_CHANGES = {
    "lr": ("--lr 0.001", 0.005, 0.001), "batch_size": ("--batch-size 8", 4, 8),
    "image_size": ("--image-size 64", 32, 64), "seed": ("--seed 1", 0, 1),
    "limit_train_batches": ("--limit-train-batches 3", 2, 3),
    "limit_eval_batches": ("--limit-eval-batches 2", 1, 2),
    "fast": ("--fast", False, True),
    "pretrained": ("--weights WEIGHTS", "none", "imagenet")}
REFUSALS = {  # case: (exit status, what the one line says)
    "no-checkpoint": (2, []), "corrupt": (1, ["cannot resume", "corrupt"]),
    "truncated": (1, ["cannot resume", "corrupt"]),
    "another-recipe": (1, ["another recipe", *(
        f"{key} {there!r} there, {here!r} here"
        for key, (_, there, here) in RECIPE_CHANGES.items())]),
    "bug.py": (1, ["another recipe", "script 'fixed' there, 'bug' here"])}
ELSEWHERE = dict(epochs=99, total_params=1, trainable_params=1, updated_params=1,
                 workers=15, weights="elsewhere/b0.pth", device="NVIDIA H200",
                 torch="2.0.0")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT to the group", "SIGTERM to every process"])
def test_a_stop_with_workers_is_one_line_and_the_printed_command_resumes(stopped, signum):
    """SIGINT to the group (Ctrl-C), SIGTERM to each process (pkill -f) of a run with
    workers: exit 130 or 143, its stop line alone, no worker left; the command resumes."""
    run = getattr(stopped, signum.name)
    assert run.returncode == 128 + signum and "Traceback" not in run.log, run.log
    assert run.command, run.log
    document, state = run.left
    assert document["status"] == "interrupted" and len(document["epochs"]) >= 1
    assert run.temps == [], run.temps
    assert run.workers, "no loader process seen: did the run use --workers 2?"
    assert run.survivors == [], f"loader processes outlived the run: {run.survivors}"
    after = (stopped.SIGTERM.left if signum == signal.SIGINT
             else complete_files(stopped.out))[1]
    assert after["history"][:state["epoch"]] == state["history"], "restarted, not resumed"
    assert len(after["history"]) > state["epoch"], "the printed command trained no epoch"


def test_a_stop_as_a_finished_run_ends_is_quiet(stopped):
    """SIGINT just after a run with workers saved "finished", while its workers end: no
    traceback, exit 0, the run's files complete."""
    run = stopped.after_done
    assert run.returncode == 0 and "Traceback" not in run.log, run.log
    assert "done:" in run.log, run.log
    assert run.left[0]["status"] == "finished" and run.survivors == []


@pytest.mark.parametrize("to", ["the group", "every process"])
def test_a_stop_as_workers_start_is_one_line(tmp_path, to):
    """SIGINT to the group, SIGTERM to every process, as the test loader's workers start
    (after the training loader's): the stop line alone, and the run resumable."""
    out, signum = tmp_path / "out", signal.SIGINT if to == "the group" else signal.SIGTERM
    command = [*FIXED, *tiny(out, "--epochs", "1", "--workers", "2")]
    run = interrupt(out, command, lambda proc: wait_for_processes(proc, 3), signum, to)
    assert run.returncode == 128 + signum and "Traceback" not in run.log, run.log
    assert run.command and run.left[0]["status"] == "interrupted", run.log


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_second_process_is_refused_while_a_run_writes(stopped, flag):
    """A second writer of a live run's files is refused in one line; the first goes on."""
    assert "another run is writing it" in one_error_line(stopped.SIGINT.second[flag], 2)
    assert stopped.SIGINT.alive_after_second, "the run ended while the second was refused"


def test_resume_equals_an_uninterrupted_run_whatever_the_workers(runs):
    """1 epoch, then --resume --epochs 3 --workers 2, is bit for bit the same as 3 epochs
    with --workers 0."""
    assert_same_run(runs["resume"].result(), runs["reference"].result().out)


def test_a_fast_resume_equals_an_uninterrupted_run(cifar, tmp_path):
    """--fast: 1 epoch, then --resume to 2, is bit for bit 2 epochs; each epoch trains
    without a last, partial batch (2 of 12 images at batch 5) drawn from (seed, epoch)."""
    fast = [*SMALL, "--fast", "--batch-size", "5", "--limit-train-batches", "3"]
    for out, *steps in (("once", ["--epochs", "2"]),
                        ("resumed", ["--epochs", "1"], ["--epochs", "2", "--resume"])):
        for step in steps:
            ok(run_here("fixed.py", *fast, "--output-dir", tmp_path / out, *step))
    assert_same_run(tmp_path / "resumed", tmp_path / "once")


@pytest.mark.parametrize("moment", ["start-up", "mid-epoch", "checkpoint-before-json"])
def test_sigkill_leaves_complete_files_and_resume_finishes_the_run(runs, moment):
    """SIGKILL at any of 3 moments leaves complete files; --resume then finishes the run
    as if uninterrupted."""
    chain = runs["reference" if moment == "start-up" else "killed"].result()
    killed = chain.killed[moment]
    assert killed.returncode == -signal.SIGKILL, f"not killed: {killed.log}"
    document, state = killed.left
    assert document is None or document["status"] == "running"
    saved = (state and state["epoch"], document and len(document["epochs"]))
    if moment == "start-up":  # 1.5 s: torch alone takes longer to import
        assert saved == (None, None), "files written within 1.5 s of the start"
    else:  # 0.1 s into epoch 2; right after a checkpoint ahead of the JSON is renamed in
        assert saved[0] >= 1 if moment == "mid-epoch" else saved[0] > saved[1] >= 1, saved
    assert_same_run(chain.out, runs["reference"].result().out)


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_resume_is_one_line_and_touches_nothing(runs, tmp_path, case):
    """A refused --resume (REFUSALS) exits 1 or 2 in one line, the folder untouched."""
    out, script = tmp_path / "out", "fixed"
    shutil.copytree(runs["reference"].result().out, out)
    argv, checkpoint = tiny(out, *EPOCHS, "--resume"), out / "fixed.pth"
    if case == "no-checkpoint":  # only the JSON: the line points to --overwrite
        checkpoint.unlink()
    elif case in ("corrupt", "truncated"):  # 1 MiB of noise, or its first half
        checkpoint.write_bytes(checkpoint.read_bytes()[:checkpoint.stat().st_size // 2]
                               if case == "truncated" else bytes(range(256)) * 4096)
    elif case == "another-recipe":  # every key changed, each named
        assert {*RECIPE_CHANGES, "script", "optimizer", "dummy"} == set(schema.RECIPE)
        from efficientnet_pytorch import EfficientNet
        # the published layout, random values
        weights = EfficientNet.from_name("efficientnet-b0").state_dict()
        torch.save(weights, tmp_path / "b0.pth")
        argv = [arg for arg in argv if arg != "--no-pretrained"] + [
            str(tmp_path / "b0.pth") if arg == "WEIGHTS" else arg
            for change, *_ in RECIPE_CHANGES.values() for arg in change.split()]
    elif case == "bug.py":  # fixed.py's run, at its lr: only the script differs
        script, argv = "bug", [*argv, "--run-name", "fixed", "--lr", "0.005"]
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    line = one_error_line(run_here(f"{script}.py", *argv), REFUSALS[case][0])
    assert all(words in line for words in REFUSALS[case][1]), line
    if case == "no-checkpoint":
        advice = line.split("fixed.json", 1)[1]
        assert "--overwrite" in advice and "--resume" not in advice, line
    after = {path.name: path.read_bytes() for path in out.iterdir()}
    assert after == before, "folder changed"


def test_resume_with_nothing_to_do_rebuilds_the_results_from_a_checkpoint_made_elsewhere(
        runs, tmp_path):
    """--resume of a finished checkpoint from elsewhere, with no JSON: the JSON is rebuilt
    and the stale temp file removed."""
    assert set(ELSEWHERE) == set(schema.CONFIG) - set(schema.RECIPE)
    out = tmp_path / "out"
    out.mkdir()
    state = torch.load(runs["reference"].result().out / "fixed.pth", weights_only=True)
    state["config"].update(ELSEWHERE)
    torch.save(state, out / "fixed.pth")
    (out / ".fixed.pth.tmp").write_bytes(b"\0" * 1000)  # what a killed write leaves
    checkpoint_bytes = (out / "fixed.pth").read_bytes()
    resumed = run_here("fixed.py", *tiny(out, "--resume", "--epochs", "2"))
    ok(resumed)
    assert f"{out}/fixed.pth already holds 3 epoch(s): nothing to train" in resumed.stdout
    document, _ = complete_files(out)
    assert (document["status"], document["config"]["epochs"], document["epochs"]) == (
        "finished", 3, state["history"])
    assert (out / "fixed.pth").read_bytes() == checkpoint_bytes and temps(out) == []


def test_a_non_finite_loss_stops_the_run_keeping_its_finished_epochs(tmp_path):
    """A NaN or infinite loss: one line, "failed", earlier epochs kept in both files."""
    out = tmp_path / "out"
    failed = run_here("fixed.py", *tiny(out, *NON_FINITE))
    assert "NaN or infinite" in one_error_line(failed, 1)
    document, state = complete_files(out)
    assert len(document["epochs"]) >= 1, f"{NON_FINITE} now fails in epoch 1: lower --lr"
    assert (document["status"], document["epochs"], temps(out)) == (
        "failed", state["history"], [])


def test_an_unexpected_error_with_workers_ends_promptly_and_the_run_resumes(runs):
    """A loss raising in epoch 2, --workers 1: traceback, one line, exit 1 in 10 s; then
    the run resumes."""
    broken = runs["unexpected"].result()
    stderr = broken.proc.stderr
    assert broken.proc.returncode == 1, stderr[-3000:]
    assert "Traceback" in stderr and "RuntimeError: injected" in stderr, stderr[-3000:]
    assert len([line for line in stderr.splitlines() if "error:" in line]) == 1, stderr
    raised_at = float(stderr.split("raising at ", 1)[1].split()[0])
    seconds = broken.ended - raised_at
    assert seconds < 10, f"{seconds:.0f} s"  # it once hung
    document, state = broken.left
    assert document["status"] == "failed"
    assert state["epoch"] == len(document["epochs"]) == 1
    assert_same_run(broken.out, runs["reference"].result().out)


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_there_is_room(runs):
    """A full --output-dir (80 MB tmpfs): one line, complete files; resumes at 200 MB."""
    # a checkpoint (~50 MB) fits beside the epoch-0 one (16 MB), not beside another
    if isinstance(runs["full-disk"], str):
        pytest.skip(runs["full-disk"])
    full = runs["full-disk"].result()
    line = one_error_line(full.proc, 1)
    assert " is full " in line and line.endswith("and --resume continues it"), line
    document, state = full.left
    assert full.temps == [] and 1 <= state["epoch"] < 3
    assert document is None or document["status"] == "failed"
    assert_same_run(full.out, runs["reference"].result().out)


def test_a_full_disk_that_saved_nothing_says_so(mount):
    """No room for the first checkpoint: one line, and no --resume advice, for nothing of
    the run is on disk to resume."""
    out = mount("disk", "size=8m") / "out"
    line = one_error_line(run_here("fixed.py", *tiny(out)), 1)
    assert f"{out} is full (no space left for fixed.pth)" in line
    assert "--resume" not in line
    assert sorted(path.name for path in out.iterdir()) == [".fixed.lock"]


@pytest.mark.parametrize("where", ["GPU", "CPU"])
def test_out_of_memory_is_one_line_naming_the_batch_size(tmp_path, where):
    """Out of GPU memory, or out of memory on the CPU: a one-line RunError naming
    --batch-size, and the status "failed"."""
    built = build("fixed.py", *tiny(tmp_path / "out"))

    def out_of_memory(module, inputs):
        if where == "GPU":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: the allocator refuses at once
    built.model.module.register_forward_pre_hook(out_of_memory)
    words = "out of GPU memory" if where == "GPU" else "out of memory in epoch 1 (cpu)"
    with pytest.raises(training.RunError, match=re.escape(words)) as error:
        train_for_real(built)
    message = str(error.value)
    assert "--batch-size" in message and "\n" not in message, error.value
    assert json.loads(built.args.results_path.read_text())["status"] == "failed"


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory):
    """{name: future or why not}: the runs below, two at a time from the first test on."""
    root, disk = map(tmp_path_factory.mktemp, ("runs", "disk"))
    pool = ThreadPoolExecutor(2)
    mounted = subprocess.run(f"mount -t tmpfs -o size=80m tmpfs {disk}", shell=True,
                             capture_output=True, text=True)
    threads = torch.get_num_threads()
    # in this process too: the runs' OMP_NUM_THREADS (conftest.ENV)
    torch.set_num_threads(1)
    futures = {name: pool.submit(chain, root / name) for name, chain in (
        ("reference", reference), ("killed", kill_twice),
        ("resume", lambda out: ok_run(out, "--epochs", "1") and ok_run(
            out, "--resume", *EPOCHS, "--workers", "2")),
        ("unexpected", break_in_epoch_2))}
    why = mounted.stderr.strip() or mounted.returncode
    futures["full-disk"] = (f"cannot mount a tmpfs: {why}" if mounted.returncode
                            else pool.submit(fill_the_disk, disk / "out"))
    yield futures
    pool.shutdown(cancel_futures=True)
    torch.set_num_threads(threads)
    if mounted.returncode == 0:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run (--workers 2) to an epoch, second writers refused meanwhile, SIGINT to its
    group; its printed command to an epoch more, SIGTERM to each process; that one's, to
    one epoch more than its checkpoint, SIGINT as it saves "finished"."""
    out = tmp_path_factory.mktemp("signals") / "out"
    argv = tiny(out, *LONG)

    def refuse_second_writers(proc):
        wait_for_epochs(out, proc, 1)
        return {flag: run_here("fixed.py", *argv, flag)
                for flag in ("--overwrite", "--resume")}
    sigint = interrupt(out, [*FIXED, *argv], refuse_second_writers, signal.SIGINT)
    sigterm = interrupt(out, sigint.command, lambda proc: wait_for_epochs(
        out, proc, sigint.left[1]["epoch"] + 1), signal.SIGTERM, to="every process")
    command = sigterm.command
    command[command.index("--epochs") + 1] = str(sigterm.left[1]["epoch"] + 1)
    after_done = interrupt(out, command,
                           lambda proc: wait_for_epochs(out, proc, "finished"),
                           signal.SIGINT, to="the main process")
    return SimpleNamespace(SIGINT=sigint, SIGTERM=sigterm, after_done=after_done, out=out)


def interrupt(out, command, until, signum=signal.SIGKILL, to="the group"):
    """`command` in its own session until(proc), then `signum` to its process group, to
    every process or to the main one: how it ended, what it left (checked complete), its
    loader processes, the command it printed to resume."""
    with open(out.parent / f"{out.name}.{signum.name}.{to}.log", "w+") as log:
        proc = subprocess.Popen(command, cwd=out.parent, env=ENV, stdout=log, stderr=log,
                                start_new_session=True)
        try:
            second = until(proc)
            alive, workers = proc.poll() is None, descendants(proc.pid)
            if alive and to == "the group":
                os.killpg(proc.pid, signum)
            elif alive:
                for pid in [proc.pid] + workers * (to == "every process"):
                    os.kill(pid, signum)
            proc.wait(timeout=10)  # else TimeoutExpired: the run did not stop within 10 s
            deadline = time.monotonic() + 10
            while any(map(running, workers)) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        text = log.read()[-3000:]
    # python fixed.py ...
    printed = text.partition("Resume with:")[2].strip().split("\n")[0]
    command = printed and [sys.executable, *shlex.split(printed)[1:]]
    return SimpleNamespace(returncode=proc.returncode, log=text, left=complete_files(out),
                           temps=temps(out), workers=workers, second=second,
                           command=command, survivors=[*filter(running, workers)],
                           alive_after_second=alive)


def reference(out):
    """The run all others are held to, after one SIGKILLed 1.5 s into start-up."""
    start_up = interrupt(out, [*FIXED, *tiny(out, *EPOCHS)], lambda proc: time.sleep(1.5))
    return SimpleNamespace(killed={"start-up": start_up}, out=ok_run(out, *EPOCHS))


def kill_twice(out):
    """SIGKILL 0.1 s into epoch 2; resuming, just after a checkpoint ahead of the JSON."""
    argv = tiny(out, *EPOCHS)
    mid_epoch = interrupt(out, [*FIXED, *argv],
                          lambda proc: wait_for_epochs(out, proc, 1) or time.sleep(0.1))
    after_checkpoint = interrupt(out, [*PATCHED, "kill", *argv, "--resume"],
                                 lambda proc: proc.wait(300))
    return SimpleNamespace(out=ok_run(out, *EPOCHS, "--resume"), killed={
        "mid-epoch": mid_epoch, "checkpoint-before-json": after_checkpoint})


def break_in_epoch_2(out):
    """A loss that raises in epoch 2, with --workers 1; then --resume."""
    proc = subprocess.run([*PATCHED, "break", *tiny(out, *EPOCHS, "--workers", "1")],
                          cwd=out.parent, env=ENV, capture_output=True, text=True,
                          timeout=120)
    return SimpleNamespace(proc=proc, ended=time.time(), left=complete_files(out),
                           out=ok_run(out, *EPOCHS, "--resume"))


def fill_the_disk(out):
    """A run on the 80 MB tmpfs; then, grown to 200 MB, --resume."""
    proc = run_script("fixed.py", *tiny(out, *EPOCHS), cwd=out.parent)
    full = SimpleNamespace(proc=proc)
    full.left, full.temps = complete_files(out), temps(out)
    subprocess.run(["mount", "-o", "remount,size=200m", str(out.parent)], check=True)
    full.out = ok_run(out, *EPOCHS, "--resume")
    return full


# [*PATCHED, MODE, *ARGV]: fixed.py ARGV, SIGKILLed once a checkpoint is renamed in ahead
# of the JSON ("kill"), or with a loss raising once the JSON holds an epoch ("break").
PATCHED = [sys.executable, "-c", """
import json, os, runpy, signal, sys, time, torch
_, fixed, mode, *args = sys.argv  # -c fixed.py MODE ARGS...
sys.argv = [fixed, *args]
sys.path.insert(0, os.path.dirname(fixed))
results = os.path.join(sys.argv[sys.argv.index("--output-dir") + 1], "fixed.json")
epochs_in = lambda path: len(json.load(open(path))["epochs"])
replace, loss = os.replace, torch.nn.CrossEntropyLoss.forward
def replace_then_die(source, target, **kwargs):
    replace(source, target, **kwargs)
    if (os.fspath(target).endswith(".pth") and os.path.exists(results)
            and torch.load(target, weights_only=True)["epoch"] > epochs_in(results)):
        os.kill(os.getpid(), signal.SIGKILL)
def loss_that_breaks(self, *args):
    if epochs_in(results):
        print(f"raising at {time.time()}", file=sys.stderr, flush=True)
        raise RuntimeError("injected")
    return loss(self, *args)
if mode == "kill": os.replace = replace_then_die
else: torch.nn.CrossEntropyLoss.forward = loss_that_breaks
runpy.run_path(fixed, run_name="__main__")
""", FIXED[1]]


def tiny(out, *extra):
    return [*TINY, "--output-dir", str(out), *extra]


def ok_run(out, *extra):
    """Run fixed.py TINY --output-dir OUT EXTRA in OUT's parent (never the checkout), and
    check that it ends well."""
    ok(run_script("fixed.py", *tiny(out, *extra), cwd=out.parent))
    return out


def ok(proc):
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def complete_files(out):
    """(results, checkpoint), each None if missing, checked: both load, the JSON a prefix
    of the .pth's history."""
    results, checkpoint = out / "fixed.json", out / "fixed.pth"
    document = json.loads(results.read_text()) if results.exists() else None
    state = (torch.load(checkpoint, map_location="cpu", weights_only=True)
             if checkpoint.exists() else None)
    assert state is None or state["epoch"] == len(state["history"])
    if document is not None:
        assert state is not None, "results without a checkpoint"
        assert document["epochs"] == state["history"][:len(document["epochs"])], \
            "the JSON is not a prefix of the checkpoint's history"
    return document, state


def assert_same_run(out, reference):
    """`out` holds a finished run, bit for bit (timing aside) the run in `reference`."""
    (document, state), (_, expected) = complete_files(out), complete_files(reference)
    assert document["status"] == "finished" and document["epochs"] == state["history"]
    assert temps(out) == [], temps(out)
    for run in (state, expected):
        run["history"] = [{k: v for k, v in e.items() if k not in TIMING}
                          for e in run["history"]]
    parts = ("history", "model", "optimizer")
    torch.testing.assert_close({part: state[part] for part in parts},
                               {part: expected[part] for part in parts},
                               rtol=0, atol=0)  # bit for bit


def temps(out):
    return sorted(path.name for path in out.glob(".*.tmp"))


def wait_for_epochs(out, proc, epochs, timeout=180):
    """Until the JSON holds `epochs` epochs, or says "finished"."""
    deadline, results = time.monotonic() + timeout, out / "fixed.json"
    while not results.exists() or not held(json.loads(results.read_text()), epochs):
        assert proc.poll() is None, (
            f"the run ended (exit {proc.returncode}) before {epochs}")
        assert time.monotonic() < deadline, f"no epoch {epochs} in {timeout} s"
        time.sleep(0.02)


def wait_for_processes(proc, count, timeout=120):
    """Until the run has `count` loader processes."""
    deadline = time.monotonic() + timeout
    while len(descendants(proc.pid)) < count:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) first"
        assert time.monotonic() < deadline, f"no {count} loader processes in {timeout} s"


def held(document, epochs):
    return (document["status"] == "finished" if epochs == "finished"
            else len(document["epochs"]) >= epochs)


def descendants(pid):
    """The processes under `pid`, read from /proc: fast enough to catch a fork."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):  # (gone since)
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                children.append(int(stat.parent.name))
    return [each for child in children for each in [child, *descendants(child)]]


def running(pid):  # not ended: a zombie (state Z or X in /proc/PID/stat) has
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False
