"""bug.py and fixed.py as a user meets them, offline on the CPU: mostly in this process,
on a tiny CIFAR-100 in ./data (fixture `cifar`), smaller than --dummy's 60,000 images."""
import ast
import difflib
import importlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from efficientnet_pytorch import EfficientNet
from torchvision import transforms

import training
from conftest import (
    ENV,
    REPO,
    SMALL,
    TEST_N,
    TINY,
    TRAIN_N,
    build,
    one_error_line,
    run_here,
    run_script,
)
from training.cli import SMOKE_RUN
from training.data import LoaderBatches

SCRIPTS = ["bug.py", "fixed.py"]
# b0 with a 100-class head; its BatchNorm weights, biases
B0_100, BN_AFFINE = 4_135_648, 42_016
# no network
PROXIES = {**dict.fromkeys(["https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"],
                           "http://127.0.0.1:9"), "no_proxy": "", "NO_PROXY": ""}
OFFLINE = {**ENV, **PROXIES}
PRETRAINED = [a for a in SMALL if a != "--no-pretrained"]
ARCHIVE, WEIGHTS = training.data.CIFAR_ARCHIVE, training.model.WEIGHTS_FILE


@pytest.mark.parametrize("script, size, batch, lr, trainable, updated", [
    ("bug.py", 1024, 4, 0.01, BN_AFFINE, 0),
    ("fixed.py", 224, 64, 0.005, B0_100, B0_100)],
    ids=SCRIPTS)
def test_what_each_script_freezes_optimizes_and_changes(cifar, script, size, batch, lr,
                                                        trainable, updated):
    """bug.py trains BN affine only, and Adam holds the frozen head: no parameter moves;
    fixed.py trains, holds and moves them all."""
    m = importlib.import_module(script.removesuffix(".py"))  # parsed as its __main__ does
    defaults = training.parse_args(m.__file__, m.__doc__, argv=["--device", "cpu"],
                                   epochs=m.EPOCHS, batch_size=m.BATCH_SIZE, lr=m.LR,
                                   image_size=m.IMAGE_SIZE)
    assert (defaults.image_size, defaults.batch_size, defaults.lr) == (size, batch, lr)
    b, bug = build(script, *SMALL), script == "bug.py"
    net, held = b.model.module, [p for g in b.optimizer.param_groups for p in g["params"]]
    assert type(b.optimizer) is torch.optim.Adam
    assert b.optimizer.param_groups[0]["lr"] == lr
    assert training.model.count_params(b.model, b.optimizer) == dict(
        total_params=B0_100, trainable_params=trainable, updated_params=updated)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    bn_affine = {f"{name}.{p}" for name, layer in net.named_modules()
                 if isinstance(layer, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == (
        bn_affine if bug else set(before))
    in_adam = [net._fc.weight, net._fc.bias] if bug else net.parameters()
    assert sorted(map(id, held)) == sorted(map(id, in_adam))
    stats = {n: t.clone() for n, t in net.named_buffers() if "running" in n}
    steps = Steps(LoaderBatches(b.train_data, b.args, train=True))
    b.script.train(b.model, steps, b.criterion, b.optimizer)  # the script's own step
    assert steps.recorded == 8  # --limit-train-batches 2 of 4
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == (set() if bug else set(before))
    assert all(not torch.equal(t, stats[n]) for n, t in net.named_buffers() if n in stats)
    # fixed: every layer is on the loss's path (dropout zeroes samples, never a tensor)
    assert bug or all(p.grad is not None and p.grad.any() for p in net.parameters())


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("script", SCRIPTS)
def test_default_batches_are_the_reports_torchvision_pipeline(cifar, script, size):
    """Workers 0 and 2 alike: the report's pipeline, bit for bit; the test set in order,
    the training set reshuffled."""
    b = build(script, "--device", "cpu", "--no-pretrained", "--workers", "0",
              "--image-size", size, "--batch-size", "4")
    views, expected, orders = {True: b.train_data, False: b.test_data}, {}, {}
    # the report's pipeline, written out again
    for (train, view), epoch in itertools.product(views.items(), (1, 2)):
        augment = [transforms.RandomHorizontalFlip(),
                   transforms.RandomRotation(10)] * train
        report = transforms.Compose([
            transforms.Resize((size, size)), *augment, transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        for index in range(len(view)):
            # seeded as SeededView seeds it, --seed 0
            with torch.random.fork_rng(devices=[]):
                seed = training.data.mix_seed(0, epoch, index)
                torch.default_generator.manual_seed(seed)
                image, label = view.images[index]
                expected[train, epoch, index] = report(image), label
    for workers, (train, view) in itertools.product((0, 2), views.items()):
        args = SimpleNamespace(**{**vars(b.args), "workers": workers})
        batches = LoaderBatches(view, args, train)
        for epoch in (1, 2):
            batches.set_epoch(epoch)
            orders[workers, train, epoch] = order = []
            for images, labels in batches:
                assert images.dtype == torch.float32
                assert images.shape[1:] == (3, size, size)
                # bit-identical to one image
                for image, label in zip(images, labels.tolist()):
                    [i] = [i for i in range(len(view))
                           if torch.equal(image, expected[train, epoch, i][0])]
                    assert label == expected[train, epoch, i][1]
                    order.append(i)
        del batches  # ends its persistent workers
    assert orders[0, False, 1] == orders[0, False, 2] == list(range(TEST_N))
    train_1, train_2 = orders[0, True, 1], orders[0, True, 2]
    assert sorted(train_1) == sorted(train_2) == list(range(TRAIN_N))
    assert list(range(TRAIN_N)) != train_1 != train_2  # shuffled anew
    assert all(orders[2, train, epoch] == orders[0, train, epoch]
               for _, train, epoch in orders)


@pytest.mark.parametrize("on_disk", [True, False], ids=["on-disk", "downloaded"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_real_cifar100_is_read_or_downloaded(cifar, monkeypatch, script, on_disk):
    """The views hold the pixels and labels of the files; where the set is missing, it is
    fetched once from CIFAR_URL."""
    fetched = []

    # torchvision's download_url, stubbed: it writes the archive
    def download_url(url, root, name, *_, **__):
        fetched.append(url)
        (Path(root) / name).write_bytes(cifar.archive)
    monkeypatch.setattr("torchvision.datasets.utils.download_url", download_url)
    if not on_disk:
        shutil.rmtree(cifar.folder)
    b = build(script, *SMALL)
    assert fetched == ([] if on_disk else [training.data.CIFAR_URL])
    for view, (pixels, labels) in ((b.train_data, cifar.train),
                                   (b.test_data, cifar.test)):
        assert len(view) == len(labels)
        assert np.array_equal(view.images.data, pixels) and view.images.targets == labels
    item, label = b.test_data[(1, 3)]  # at 32 px the test transforms keep the pixels
    assert torch.equal(item.permute(1, 2, 0), torch.from_numpy(cifar.test[0][3]))
    assert label == cifar.test[1][3]


def test_weights_file_is_the_backbone_and_the_seed_draws_the_head(cifar):
    """--weights PATH: the backbone is the file's; the new head depends only on --seed."""
    state, heads = save_b0("b0.pth"), []
    for seed, global_seed in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(global_seed)
        built = build("fixed.py", *PRETRAINED, "--seed", seed,
                      "--weights", "b0.pth").model.module.state_dict()
        assert all(torch.equal(built[k], v)
                   for k, v in state.items() if not k.startswith("_fc"))
        assert built["_fc.weight"].shape == (100, 1280)
        heads.append(built["_fc.weight"])
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


@pytest.mark.parametrize("make, words", [  # how --weights W is made, what the line says
    (lambda: None, "cannot be read (No such file"),
    (lambda: Path("w").mkdir(), "Is a directory"),
    (lambda: Path("w").write_text("not weights\n"), "not a PyTorch state dict"),
    (lambda: torch.save(nn.Linear(3, 2).state_dict(), "w"), "Missing key(s)"),
    (lambda: torch.save({**save_b0("w"),
                         "_conv_stem.weight": torch.zeros(16, 3, 3, 3)}, "w"),
     "size mismatch for _conv_stem.weight"),
    (lambda: torch.save({"model": save_b0("w"), "optimizer": {}, "history": []}, "w"),
     "Missing key(s)")],
    ids=["no file", "a directory", "a text file", "another model", "b0, other shapes",
         "a run checkpoint"])
def test_weights_that_are_not_b0s_are_refused(cifar, make, words):
    """fixed.py --weights W: exit 2, one line: what W is; nothing built or written."""
    make()
    proc = run_here("fixed.py", *PRETRAINED, "--weights", "w", "--output-dir", "out")
    line = one_error_line(proc, 2)
    assert line.startswith("fixed.py: error: --weights w: ") and words in line
    assert "parameters require grad" not in proc.stdout and not Path("out").exists()


REFUSED = [  # argv (after --device cpu --output-dir out), what the one error line says
    ("--epochs 0", "--epochs: must be a positive number, not 0"),
    ("--batch-size 0", "--batch-size: must be a positive number, not 0"),
    *((f"--lr {v}", f"--lr: must be a positive number, not {v}")
      for v in ("0", "nan", "inf")),
    ("--lr 1e38", "--lr 1e+38: must be at most 1000"),
    *((f"--image-size {v}", f"--image-size {v}: must be 32 to 2048") for v in (16, 4096)),
    ("--batch-size 60000", "--batch-size 60000: more than the 50,000 images"),
    ("--workers -1", "--workers: must be 0 or more"),
    ("--seed -1", "--seed: must be 0 or more"),
    ("--workers 100000", "--workers 100000: must be at most 64"),
    *((f"--seed {s}", f"--seed {s}: must be below 2**63") for s in (2**63, 10**400)),
    *((f"--device {d}", f"--device {d}: use cuda, cuda:N or cpu")
      for d in ("tpu", "cuda:01")),
    ("--device cuda", "CUDA is not available", f"python fixed.py {SMOKE_RUN}"),
    *((f"--run-name {shlex.quote(name)}",
       f"--run-name {name!r}: must be a plain file name")
      for name in ("a/b", ".hidden", "", "a\nb")),
    ("--output-dir a_file/out", "--output-dir a_file/out: a_file is a file"),
    ("--output-dir /proc/out", "--output-dir /proc/out: cannot be created in /proc"),
    ("--data-dir a_file", "--data-dir a_file: a_file is a file"),
    ("--weights a_file --no-pretrained", "--weights and --no-pretrained contradict"),
    ("--resume --overwrite", "--resume continues a run and --overwrite replaces it"),
    ("--output-dir earlier", "earlier/fixed.json holds an earlier run", "--overwrite")]


@pytest.mark.parametrize("case", REFUSED, ids=[case[0][:30] for case in REFUSED])
def test_a_bad_command_line_is_refused_before_anything_loads(capsys, case):
    """training.parse_args: exit 2, one line: the flag and what to do; nothing created."""
    argv, *words = case
    if argv == "--device cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    Path("earlier").mkdir()
    Path("a_file").write_text("x")
    Path("earlier/fixed.json").write_text("{}")
    files = tree()
    with pytest.raises(SystemExit) as exit_:  # from training.parse_args
        build("fixed.py", "--device", "cpu", "--output-dir", "out", *shlex.split(argv))
    proc = SimpleNamespace(returncode=exit_.value.code, stderr=capsys.readouterr().err)
    line = one_error_line(proc, 2)
    assert line.startswith("fixed.py: error: ") and all(w in line for w in words), line
    assert tree() == files


@pytest.fixture(scope="module")
def where_module_fixtures_start():
    return Path.cwd()


def test_no_fixture_starts_in_the_checkout(where_module_fixtures_start):
    """The README's smoke run leaves results/ in the checkout; a module's fixture that
    built a run there met "holds an earlier run", and failed the suite."""
    assert REPO not in [where_module_fixtures_start, *where_module_fixtures_start.parents]


# A process of root's, but held to permission bits as any user is.
AS_A_USER = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
             "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


@pytest.mark.skipif(AS_A_USER and not shutil.which("setpriv"),
                    reason="root, and no setpriv")
def test_folders_this_user_cannot_use_are_one_line(tmp_path):
    """Behind a folder it cannot search, in one it cannot write: exit 2, one line each."""
    Path("locked/inner").mkdir(parents=True)
    Path("read-only").mkdir()
    cases = {"--output-dir locked/inner/out": "cannot be reached (permission denied",
             "--data-dir locked/inner/data": "cannot be reached (permission denied",
             "--output-dir read-only": "cannot be written (permission denied)"}
    Path("locked").chmod(0)
    Path("read-only").chmod(0o555)
    try:
        with ThreadPoolExecutor(2) as pool:  # CI's 2 cores
            procs = list(pool.map(lambda argv: subprocess.run(
                [*AS_A_USER, sys.executable, REPO / "fixed.py", "--device", "cpu",
                 *argv.split()],
                env=ENV, capture_output=True, text=True, timeout=120), cases))
    finally:
        Path("locked").chmod(0o755)
    for proc, (argv, words) in zip(procs, cases.items()):
        assert one_error_line(proc, 2).startswith(f"fixed.py: error: {argv}: {words}")


def test_a_read_only_file_system_is_named_so(mount, capsys):
    read_only = mount("ro", "ro,size=1m")
    for folder, words in ((read_only, "cannot be written (a read-only file system)"),
                          (read_only / "out", "cannot be created in")):
        with pytest.raises(SystemExit) as exit_:
            build("fixed.py", *TINY, "--output-dir", folder)
        proc = SimpleNamespace(returncode=exit_.value.code,
                               stderr=capsys.readouterr().err)
        assert words in one_error_line(proc, 2) and "read-only" in proc.stderr


def test_dummy_data_needs_no_data_dir_and_a_run_name_too_long_is_one_line():
    """--dummy reads no --data-dir; a run name no file system takes fails at the lock."""
    Path("a_file").write_text("x")
    proc = run_here("fixed.py", *TINY, "--data-dir", "a_file/data", "--run-name", "x" * 300)
    assert "File name too long" in one_error_line(proc, 2)
    assert "parameters require grad" in proc.stdout  # the data set was built


def test_the_readmes_smoke_runs_are_the_no_gpu_hint_and_each_takes_under_a_minute():
    """The README's no-GPU commands, as printed: both scripts, then compare.py on their
    results; the hint printed where CUDA is missing is one of them."""
    readme = (REPO / "README.md").read_text().split("No GPU?", 1)[1]
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines()]
    assert shlex.split(f"python fixed.py {SMOKE_RUN}") in commands
    assert [command[:2] for command in commands] == [
        ["python", "bug.py"], ["python", "fixed.py"], ["python", "compare.py"]]
    with ThreadPoolExecutor(2) as pool:  # CI's 2 cores
        runs = pool.map(lambda argv: run_script(argv[1], *argv[2:], timeout=60),
                        commands[:2])
        assert [run.returncode for run in runs] == [0, 0]
    assert run_script(*commands[2][1:], timeout=60).returncode == 0


def test_real_processes_refuse_or_fail_in_one_line_and_import_silently(tmp_path):
    """Offline: exit status, one error line, no stdout, nothing written; and
    `import bug, fixed` is silent."""
    Path("junk.pth").write_text("not weights")
    Path("locked/.fixed.lock").mkdir(parents=True)  # the lock cannot be taken
    files = tree()
    cases = [  # python's argv, exit status, how the one error line starts
        (["-c", "import bug, fixed"], 0, None),  # no output at all
        ([REPO / "bug.py", "--lr", "nan"], 2,
         "bug.py: error: argument --lr: must be a positive"),
        ([REPO / "fixed.py", *SMALL], 1,  # and only that line: no progress bar
         "fixed.py: error: CIFAR-100 is not in data/ and could not be downloaded"),
        # before CIFAR
        ([REPO / "fixed.py", "--device", "cpu", "--weights", "junk.pth"], 2,
         "fixed.py: error: --weights junk.pth: not a PyTorch state dict"),
        ([REPO / "fixed.py", *TINY, "--output-dir", "locked"], 2,
         "fixed.py: error: cannot lock locked/.fixed.lock")]
    with ThreadPoolExecutor(2) as pool:  # CI's 2 cores
        procs = list(pool.map(lambda case: subprocess.run(
            [sys.executable, *case[0]], cwd=tmp_path,
            env={**OFFLINE, "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=300), cases))
    assert (procs[0].returncode, procs[0].stdout, procs[0].stderr) == (0, "", "")
    for proc, (_, status, start) in zip(procs[1:], cases[1:]):
        assert one_error_line(proc, status).startswith(start)
        assert proc.stdout == "" or proc is procs[-1]  # the lock is taken once loaded
    assert procs[2].stderr.count("\n") == 1
    assert all(w in procs[2].stderr
               for w in (ARCHIVE, training.data.CIFAR_URL, "--dummy"))
    assert tree() == files


@pytest.mark.parametrize("cut_short, argv, words", [
    # cut_short: a file left unfinished; words: what the line says
    (f"d/{ARCHIVE}", ["--data-dir", "d"],
     [f"d/{ARCHIVE} is incomplete or corrupt", "--dummy"]),
    ("d/cifar-100-python/train", ["--data-dir", "d"],
     ["d/cifar-100-python is incomplete or corrupt", ARCHIVE, "--dummy"]),
    (None, ["--data-dir", "x/d"],  # x/ too
     ["CIFAR-100 is not in x/d/", ARCHIVE, "--dummy"]),
    (None, [], [WEIGHTS, "{home}/hub/checkpoints/", "--weights"]),
    (f"home/hub/checkpoints/{WEIGHTS}", [],
     [f"{{home}}/hub/checkpoints/{WEIGHTS} is corrupt",
      "delete it to download it again, or pass --weights PATH"])],
    ids=["truncated archive", "corrupt folder", "no data in x/d", "no weights",
         "corrupt weights"])
def test_offline_a_missing_resource_is_one_line(cifar, monkeypatch, cut_short, argv,
                                                words):
    """fixed.py offline, empty hub: exit 1, one line saying what to do; no folder left."""
    for name, value in {**PROXIES, "TORCH_HOME": str(Path("home").absolute())}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("urllib.request._opener", None)  # a new one reads the proxy
    Path("home/hub/checkpoints").mkdir(parents=True)
    if cut_short:  # what an interrupted download leaves
        Path(cut_short).parent.mkdir(parents=True, exist_ok=True)
        Path(cut_short).write_bytes(b"PK\x03\x04" + bytes(1000))
    files = tree()
    proc = run_here("fixed.py", *PRETRAINED, "--output-dir", "out", *argv)
    line = one_error_line(proc, 1)
    assert proc.stderr.splitlines() == [line]
    assert all(w.format(home=Path("home").absolute()) in line for w in words), line
    assert ("is not in" in line) == (argv[-1:] == ["x/d"])  # corrupt is not missing
    assert tree() == files


def test_the_diff_between_the_scripts_is_the_fix():
    """`diff bug.py fixed.py`: ≤ 30 lines, each a comment, marked, freezing or Adam's
    argument; the step, train() and validate(), the same in both."""
    text = {s: (REPO / s).read_text() for s in SCRIPTS}
    assert all(f"ROOT CAUSE {n}:" in text["bug.py"] and f"FIX {n}" in text["fixed.py"]
               for n in range(1, 5))
    assert "requires_grad" not in text["fixed.py"]
    adam, allowed = [], {}
    for script in SCRIPTS:  # the docstring, the Adam call, the freezing loops
        module = ast.parse(text[script])
        kept = [module.body[0], *(
            n for n in ast.walk(module)
            if isinstance(n, ast.For) and "requires_grad" in ast.unparse(n)
            or isinstance(n, ast.Call) and ast.unparse(n.func) == "optim.Adam")]
        adam += [ast.unparse(n) for n in kept if isinstance(n, ast.Call)]
        allowed[script] = {i for n in kept for i in range(n.lineno, n.end_lineno + 1)}
    head = "model_transfer.module._fc.parameters()"  # only its parameters
    assert adam[0].replace(head, "model_transfer.parameters()") == adam[1] != adam[0]
    # each script's own step, the same in both, in order
    loops = {script: [ast.unparse(node) for node in ast.parse(text[script]).body
                      if isinstance(node, ast.FunctionDef)
                      and node.name in ("train", "validate")]
             for script in SCRIPTS}
    assert loops["bug.py"] == loops["fixed.py"] and len(loops["bug.py"]) == 2
    assert re.search(r"optimizer.zero_grad\(\)\s+output = model\(images\)\s+"
                     r"loss = criterion\(output, labels\)\s+"
                     r"loss.backward\(\)\s+optimizer.step\(\)", loops["bug.py"][0])
    lines = {s: text[s].splitlines() for s in SCRIPTS}
    ops = [op for op in difflib.SequenceMatcher(None, *lines.values(), autojunk=False)
           .get_opcodes() if op[0] != "equal"]
    changed = {"bug.py": {i for _, a, b, _, _ in ops for i in range(a + 1, b + 1)},
               "fixed.py": {j for *_, c, d in ops for j in range(c + 1, d + 1)}}
    assert len(changed["bug.py"]) + len(changed["fixed.py"]) <= 30
    for script, marker in zip(SCRIPTS, ("ROOT CAUSE", "FIX")):
        for n in changed[script]:
            line = lines[script][n - 1].strip()
            assert (n in allowed[script] or line[:1] in ("", "#")
                    or marker in line), (script, n)


def test_fixed_py_end_to_end_with_workers_started_by_spawn(tmp_path):
    """Spawned workers re-import fixed.py and must not run it; results/README.md kept."""
    Path("results").mkdir()
    Path("results/README.md").write_text("What results/ holds.\n")
    Path("site").mkdir()
    # as on macOS and Windows; marks spawned workers
    Path("site/sitecustomize.py").write_text(
        'import multiprocessing, os, sys\nmultiprocessing.set_start_method("spawn")\n'
        'if "--multiprocessing-fork" in sys.argv:\n'
        '    open(os.environ["SPAWNED"], "a").write("worker\\n")\n')
    proc = run_script("fixed.py", *TINY, "--workers", "1", "--epochs", "1", cwd=tmp_path,
                      env={**OFFLINE, "PYTHONPATH": str(tmp_path / "site"),
                           "SPAWNED": str(tmp_path / "spawned")}, timeout=150)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_finished(tmp_path, "fixed.py", proc.stdout)
    assert Path("results/README.md").read_text() == "What results/ holds.\n"
    assert "worker" in Path("spawned").read_text()


def test_bug_py_with_fast_on_the_cpu(cifar, tmp_path):
    """--fast on a CPU: one notice that torch.compile needs CUDA, then a finished run."""
    proc = run_here("bug.py", *SMALL, "--fast", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    notices = [line for line in proc.stdout.splitlines() if "torch.compile" in line]
    assert len(notices) == 1 and "needs CUDA, not cpu" in notices[0], notices
    assert_finished(tmp_path, "bug.py", proc.stdout)


def test_the_epoch_line_names_every_number():
    """Each number with its unit; images/s without an exponent; GPU memory (reserved with
    --fast) where there is a GPU; the warm-up left out of the images/s."""
    entry = dict(epoch=2, train_loss=1.5, train_acc=12.5, test_loss=2.25, test_acc=23.75,
                 epoch_seconds=61.5, train_images_per_second=99.7,
                 peak_gpu_memory_gib=None, warmup_seconds=89.0)
    head = ("epoch 2/40: train loss 1.5000 acc 12.50% | "
            "test loss 2.2500 acc 23.75% | 61.5 s, ")
    line, args = training.loop.epoch_line, SimpleNamespace(epochs=40, fast=False)
    assert line(entry, args) == head + "100 train img/s, warm-up 89.0 s"  # not 1e+02
    assert line({**entry, "train_images_per_second": 0.214}, args) == \
        head + "0.21 train img/s, warm-up 89.0 s"
    gpu = {**entry, "train_images_per_second": 1234.0, "peak_gpu_memory_gib": 7.5}
    assert line(gpu, args) == head + "1,234 train img/s, peak 7.50 GiB, warm-up 89.0 s"
    assert line(gpu, SimpleNamespace(epochs=40, fast=True)) == \
        head + "1,234 train img/s, peak 7.50 GiB reserved, warm-up 89.0 s"
    assert [training.loop.rate(r) for r in (9.97, 99.7, 999.7)] == ["10", "100", "1,000"]


STARTUP = {"bug.py": "bug: 42,016 of 4,135,648 parameters require grad, 0 of them",
           "fixed.py": ("fixed: 4,135,648 of 4,135,648 parameters require grad, "
                        "4,135,648 of them")}
EPOCH_LINE = (r"epoch 1/1: train loss \d+\.\d{4} acc \d+\.\d\d% \| test loss \d+\.\d{4} "
              r"acc \d+\.\d\d% \| \d+\.\d s, [\d.,]+ train img/s, warm-up \d+\.\d s")


def assert_finished(folder, script, stdout):  # the lines a run prints, and its two files
    name, lines = script.removesuffix(".py"), stdout.splitlines()
    startup = STARTUP[script] + " in the optimizer;"
    assert any(line.startswith(startup) for line in lines), stdout
    assert any(re.fullmatch(EPOCH_LINE, line) for line in lines), stdout
    assert lines[-1] == f"done: results/{name}.json and results/{name}.pth"
    results = json.loads((folder / f"results/{name}.json").read_text())
    assert results["status"] == "finished"
    assert "model" in torch.load(folder / f"results/{name}.pth", weights_only=True)


class Steps(list):
    """An epoch's batches for a script's train(), with the record() it calls each step."""
    def __init__(self, batches):
        batches.set_epoch(1)
        super().__init__(batches)
        self.recorded = 0

    def record(self, loss, output, labels):
        self.recorded += len(labels)


def save_b0(path):
    """A b0 state dict in the published ImageNet layout (1000 classes), random values."""
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in EfficientNet.from_name("efficientnet-b0").state_dict().items()}
    torch.save(state, path)
    return state


def tree():
    return sorted(str(p) for p in Path().rglob("*"))
