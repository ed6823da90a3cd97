"""ablation.sh: the ladder's five commands, in order, each rung with its own recipe, run
by a stand-in interpreter (PYTHON) that only records its command line; then each recorded
training command is built for real (the script's build()) to check what it would train."""
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, build
from training.model import count_params

FLAGS = ["--dummy", "--device", "cpu", "--no-pretrained", "--epochs", "2"]
# rung: (image size, batch size, lr, parameters the optimizer updates)
LADDER = {"bug": (1024, 4, 0.01, 0),
          "unfreeze-only": (1024, 4, 0.01, 4_135_648),
          "unfreeze-224px": (224, 4, 0.01, 4_135_648),
          "fixed": (224, 64, 0.005, 4_135_648)}


def ablation(tmp_path, *argv):
    """Run ablation.sh with a PYTHON that records each command line; returns
    (CompletedProcess, [argv of each command])."""
    log = tmp_path / "commands.log"
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/sh\nprintf "%s\\0" "$@" >> "$LOG"\nprintf "\\n" >> "$LOG"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), LOG=str(log))
    done = subprocess.run([str(REPO / "ablation.sh"), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    lines = log.read_text().splitlines() if log.exists() else []
    return done, [line.rstrip("\0").split("\0") for line in lines]


def test_the_ladder_changes_one_thing_per_rung(tmp_path):
    done, commands = ablation(tmp_path, *FLAGS, "--output-dir", "out")
    assert done.returncode == 0, done.stderr
    *runs, compare = commands
    scripts = [Path(c[0]).name for c in runs]
    assert scripts == ["bug.py", "fixed.py", "fixed.py", "fixed.py"]
    for command, (rung, (size, batch, lr, updated)) in zip(runs, LADDER.items()):
        # the user's flags
        assert command[-len(FLAGS) - 2:] == [*FLAGS, "--output-dir", "out"]
        built = build(command[0], *command[1:])
        args = built.args
        assert args.run_name == rung
        assert (args.image_size, args.batch_size, args.lr) == (size, batch, lr)
        assert count_params(built.model, built.optimizer)["updated_params"] == updated
    assert Path(compare[0]).name == "compare.py"
    results = [f"out/{rung}.json" for rung in LADDER]
    assert compare[1:] == results + ["--plot", "out/ablation.png"]


def test_output_dir_with_equals_is_where_compare_reads(tmp_path):
    done, commands = ablation(tmp_path, *FLAGS, "--output-dir=out")
    assert done.returncode == 0, done.stderr
    results = [f"out/{rung}.json" for rung in LADDER]
    assert commands[-1][1:] == results + ["--plot", "out/ablation.png"]


@pytest.mark.parametrize("flag", ["--run-name", "--image-size", "--batch-size", "--lr"])
@pytest.mark.parametrize("form", ["separate", "equals"])
def test_a_rungs_own_setting_is_refused(tmp_path, flag, form):
    argv = [flag, "8"] if form == "separate" else [f"{flag}=8"]
    done, commands = ablation(tmp_path, *FLAGS, *argv)
    assert done.returncode == 2 and commands == []
    message = f"ablation.sh: error: {flag} is set per rung; leave it out"
    assert done.stderr.strip() == message


def test_resume_resumes_the_started_rungs_and_starts_the_others(tmp_path):
    """A ladder interrupted in its second rung: --resume goes on the two rungs with a
    checkpoint, not on the two without one (refused there, it would stop the ladder)."""
    out = tmp_path / "out"
    out.mkdir()
    for rung in ("bug", "unfreeze-only"):
        (out / f"{rung}.pth").write_bytes(b"")
    done, commands = ablation(tmp_path, *FLAGS, "--output-dir", "out", "--resume")
    assert done.returncode == 0, done.stderr
    resumed = {command[command.index("--run-name") + 1]: "--resume" in command
               for command in commands[:-1]}
    assert resumed == {"bug": True, "unfreeze-only": True, "unfreeze-224px": False,
                       "fixed": False}


def test_help_shows_the_ladder_and_runs_nothing(tmp_path):
    done, commands = ablation(tmp_path, "--help")
    assert done.returncode == 0 and commands == []
    assert "unfreeze-224px" in done.stdout and "--output-dir" in done.stdout
    assert "quick" not in done.stdout and "1024 px" in done.stdout  # it takes minutes
