"""bug.py and fixed.py: what each builds (the frozen model, the optimizer, the transforms,
the data and the weights), what a few training steps do to it, the command line end to end,
and a clear one-line error for every bad input and missing resource. CPU only, no network."""
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from efficientnet_pytorch import EfficientNet
from torchvision import datasets, transforms

import training
from conftest import TINY, run_script

TOTAL_B0_100 = 4_135_648   # EfficientNet-b0 with a 100-class head
BN_AFFINE_B0 = 42_016      # its BatchNorm weights and biases
WEIGHTS_FILE = "efficientnet-b0-355c32eb.pth"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
NO_NETWORK = {k: "http://127.0.0.1:9" for k in ("https_proxy", "HTTPS_PROXY", "http_proxy",
                                                 "HTTP_PROXY")}
SCRIPTS = ["bug.py", "fixed.py"]


def tiny(out):
    return [*TINY, "--output-dir", out]


def offline_env(**extra):
    env = dict(os.environ, **NO_NETWORK, **{k: str(v) for k, v in extra.items()})
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


def assert_one_line_error(stderr, script, *fragments):
    """Exactly one `SCRIPT: error: ...` line holding every fragment, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def params(model):
    return {name: p.detach().clone() for name, p in model.module.named_parameters()}


def bn_modules(model):
    return {name: m for name, m in model.module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def report_pipeline(size, train):
    """The report's transforms, written out again: what the views must match bit for bit."""
    augment = [transforms.RandomHorizontalFlip(), transforms.RandomRotation(10)] if train else []
    return transforms.Compose([transforms.Resize((size, size)), *augment,
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def seeded(seed, epoch, index, function, *args):
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(training.mix_seed(seed, epoch, index))
        return function(*args)


def save_b0_weights(path, seed=1234):
    """An ImageNet-layout (1000-class) b0 state dict with random values, unlike seed 0's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = EfficientNet.from_name("efficientnet-b0").state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def assert_backbone_is(model, state):
    built = model.module.state_dict()
    backbone = [k for k in state if not k.startswith("_fc.")]
    assert set(backbone) == {k for k in built if not k.startswith("_fc.")}
    for key in backbone:
        assert torch.equal(built[key], state[key]), key
    assert built["_fc.weight"].shape == (100, 1280)  # the scripts' new head, not ImageNet's


# --------------------------------------------------------------------------- 1. freezing

def test_bug_updates_no_parameter(build, tmp_path):
    b = build("bug.py", *tiny(tmp_path / "out"))
    model, optimizer = b.model, b.optimizer
    counts = training.count_params(model, optimizer)
    assert counts == dict(total_params=TOTAL_B0_100, trainable_params=BN_AFFINE_B0,
                          updated_params=0)
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert trainable and all("bn" in n for n in trainable)
    # exactly the BatchNorm affine parameters, nothing else
    bn_affine = {f"{name}.{p}" for name, m in bn_modules(model).items() for p in ("weight", "bias")}
    assert trainable == bn_affine
    fc = model.module._fc
    assert fc.out_features == 100 and not any(p.requires_grad for p in fc.parameters())
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == 2
    assert {id(p) for p in in_optimizer} == {id(fc.weight), id(fc.bias)}
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 0.01


def test_fixed_updates_every_parameter(build, tmp_path):
    b = build("fixed.py", *tiny(tmp_path / "out"))
    counts = training.count_params(b.model, b.optimizer)
    assert counts == dict(total_params=TOTAL_B0_100, trainable_params=TOTAL_B0_100,
                          updated_params=TOTAL_B0_100)
    in_optimizer = [p for g in b.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in b.model.parameters()}
    assert len(in_optimizer) == len(list(b.model.parameters()))
    assert isinstance(b.optimizer, torch.optim.Adam) and b.optimizer.param_groups[0]["lr"] == 0.005


# --------------------------------------------------------------------------- 2. training steps

@pytest.mark.parametrize("script", SCRIPTS)
def test_training_steps(build, tmp_path, script):
    b = build(script, *tiny(tmp_path / "out"))
    model, args = b.model, b.args
    before = params(model)
    stats_before = {name: (m.running_mean.clone(), m.running_var.clone())
                    for name, m in bn_modules(model).items()}
    engine = training.Engine(args, model)
    loader = training.make_loader(b.train_set, args, True)
    loader.sampler.epoch = 1
    model.train()
    torch.manual_seed(0)
    steps = 0
    for images, labels in loader:  # --limit-train-batches 2
        images, labels = engine.to_device(b.train_set, images, labels)
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        output, loss = training.train_step(model, b.criterion, b.optimizer, engine, images, labels)
        assert output.shape == (4, 100) and math.isfinite(loss.item())
        steps += 1
    assert steps == 2
    after = params(model)
    assert before.keys() == after.keys()
    if script == "bug.py":
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert changed == [], f"bug.py updated {changed[:3]}"
        # ...yet the BatchNorm running statistics, buffers outside the optimizer, moved
        for name, m in bn_modules(model).items():
            mean, var = stats_before[name]
            assert not torch.equal(mean, m.running_mean), name
            assert not torch.equal(var, m.running_var), name
    else:
        unchanged = [n for n in before if torch.equal(before[n], after[n])]
        assert unchanged == [], f"fixed.py left {unchanged[:3]} unchanged"


# --------------------------------------------------------------------------- 3. transforms

@pytest.mark.parametrize("script, size", [("bug.py", 1024), ("fixed.py", 224)])
def test_transforms_match_the_report_bit_for_bit(build, tmp_path, script, size):
    # the script's own default image size: no --image-size
    b = build(script, "--dummy", "--device", "cpu", "--no-pretrained", "--workers", "0",
              "--output-dir", tmp_path / "out")
    assert b.args.image_size == size
    cpu = torch.device("cpu")
    for view, train in ((b.train_set, True), (b.test_set, False)):
        for epoch, index in ((1, 7), (2, 7), (1, 49_999 if train else 9_999)):
            item, label = view[(epoch, index)]
            image, expected_label = view.images[index]
            assert label == expected_label
            assert item.dtype == torch.uint8 and item.shape == (3, size, size)
            got = view.on_device(item.unsqueeze(0), cpu)
            assert got.dtype == torch.float32 and got.shape == (1, 3, size, size)
            want = seeded(b.args.seed, epoch, index, report_pipeline(size, train), image)
            assert torch.equal(got[0], want), (script, train, epoch, index)
    # the train view does augment (the rotation alone makes it differ from the test view),
    # differently per epoch, and the test view does not
    train_1, train_2 = b.train_set[(1, 7)][0], b.train_set[(2, 7)][0]
    assert not torch.equal(train_1, train_2)
    assert torch.equal(b.test_set[(1, 7)][0], b.test_set[(2, 7)][0])


# --------------------------------------------------------------------------- 4. real CIFAR-100

def write_cifar100(root, n_train=6, n_test=4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(x) for x in rng.integers(0, 100, n)]
        splits[split] = (data, fine)
        entry = {"data": data, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
                 "filenames": [f"{split}_{i}.png" for i in range(n)],
                 "batch_label": f"{split} batch"}
        with open(folder / split, "wb") as file:
            pickle.dump(entry, file)
    meta = {"fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    with open(folder / "meta", "wb") as file:
        pickle.dump(meta, file)
    return splits


def test_real_cifar100_on_disk(build, tmp_path, monkeypatch):
    splits = write_cifar100(tmp_path / "data")
    for key, value in NO_NETWORK.items():
        monkeypatch.setenv(key, value)
    # our files are not the published ones: skip only the md5 comparison
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    b = build("fixed.py", "--device", "cpu", "--no-pretrained", "--workers", "0",
              "--data-dir", tmp_path / "data", "--image-size", "32",
              "--output-dir", tmp_path / "out")
    assert not (tmp_path / "data" / training.CIFAR_ARCHIVE).exists()  # nothing downloaded
    cpu = torch.device("cpu")
    for view, split in ((b.train_set, "train"), (b.test_set, "test")):
        data, fine = splits[split]
        assert isinstance(view.images, datasets.CIFAR100)
        assert view.images.train == (split == "train")
        assert len(view) == len(data)
        assert view.images.classes[:2] == ["fine_0", "fine_1"]
        for index in range(len(data)):
            chw = torch.from_numpy(data[index].reshape(3, 32, 32))
            image, label = view.images[index]
            assert label == fine[index]
            assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1), chw)
            item, label = view[(1, index)]
            assert label == fine[index]
            if split == "test":  # Resize(32) of a 32x32 image: the pixels themselves
                assert torch.equal(item, chw)
                got = view.on_device(item.unsqueeze(0), cpu)[0]
                expected = (chw.float() / 255 - torch.tensor(MEAN)[:, None, None]) \
                    / torch.tensor(STD)[:, None, None]
                torch.testing.assert_close(got, expected)


def test_cifar100_is_downloaded_when_missing(build, tmp_path, monkeypatch):
    """A first run fetches CIFAR-100 itself: torchvision's download, from the published URL
    (stubbed here: it writes the small data set, in the real layout)."""
    for key, value in NO_NETWORK.items():
        monkeypatch.setenv(key, value)
    fetched = []

    def download_and_extract_archive(url, root, filename=None, md5=None):
        fetched.append(url)
        write_cifar100(Path(root))

    monkeypatch.setattr(datasets.cifar, "download_and_extract_archive",
                        download_and_extract_archive)
    monkeypatch.setattr(datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))
    b = build("fixed.py", "--device", "cpu", "--no-pretrained", "--workers", "0",
              "--data-dir", tmp_path / "data", "--image-size", "32",
              "--output-dir", tmp_path / "out")
    assert fetched == [training.CIFAR_URL]  # once: the test split finds it there
    assert isinstance(b.train_set.images, datasets.CIFAR100) and len(b.train_set) == 6
    assert len(b.test_set) == 4


# --------------------------------------------------------------------------- 5. weights

def test_weights_from_file_and_from_hub_cache(build, tmp_path, monkeypatch):
    for key, value in NO_NETWORK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    path = tmp_path / WEIGHTS_FILE
    state = save_b0_weights(path)
    assert state["_fc.weight"].shape == (1000, 1280)

    b = build("fixed.py", "--device", "cpu", "--dummy", "--workers", "0", "--image-size", "32",
              "--weights", path, "--output-dir", tmp_path / "out")
    assert b.args.weights == path and b.args.pretrained == "imagenet"
    assert_backbone_is(b.model, state)

    # no --weights: the published file name in $TORCH_HOME/hub/checkpoints is used as is
    cached = tmp_path / "home" / "hub" / "checkpoints" / WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    shutil.copyfile(path, cached)
    b = build("bug.py", "--device", "cpu", "--dummy", "--workers", "0", "--image-size", "32",
              "--output-dir", tmp_path / "out")
    assert b.args.weights is None and b.args.pretrained == "imagenet"
    assert_backbone_is(b.model, state)


def test_the_seed_decides_the_new_head_with_pretrained_weights(build, tmp_path, monkeypatch):
    """--seed, not whatever state torch's generator is in, draws the new 100-class head."""
    for key, value in NO_NETWORK.items():
        monkeypatch.setenv(key, value)
    weights = tmp_path / WEIGHTS_FILE
    save_b0_weights(weights)
    argv = ["--device", "cpu", "--dummy", "--workers", "0", "--image-size", "32",
            "--weights", weights, "--output-dir", tmp_path / "out"]

    def head(*seed):
        torch.manual_seed(12345)  # the same global state before every build
        return build("fixed.py", *argv, *seed).model.module._fc.weight.detach().clone()

    assert torch.equal(head(), head("--seed", "0"))  # 0 is the default
    assert not torch.equal(head(), head("--seed", "1"))


def test_weights_of_another_shape_are_refused(tmp_path):
    """b0's keys with another model's shapes (a b1 file renamed, say): refused by name
    before the run, not a traceback in load_state_dict."""
    path = tmp_path / WEIGHTS_FILE
    state = save_b0_weights(path)
    state["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(state, path)
    problem = training.check_weights_file(path)
    assert "shapes" in problem and "_conv_stem.weight is (16, 3, 3, 3)" in problem, problem


def test_epoch_line_names_each_number():
    """The line a user watches: each figure under its own name (values chosen apart)."""
    entry = dict(epoch=2, train_loss=1.5, train_acc=12.5, test_loss=2.25, test_acc=23.75,
                 epoch_seconds=61.5, train_images_per_second=1234.0, peak_gpu_memory_gib=7.5,
                 warmup_seconds=89.0)
    assert training.epoch_line(entry, 40) == (
        "epoch 2/40: train loss 1.5000 acc 12.50% | test loss 2.2500 acc 23.75% | 61.5 s, "
        "1,234 train img/s, peak 7.50 GiB reserved, compile warm-up 89 s")
    default = dict(entry)
    del default["warmup_seconds"]  # not compiled: the peak is allocated memory
    assert training.epoch_line(default, 40).endswith("1,234 train img/s, peak 7.50 GiB")
    cpu = dict(default, peak_gpu_memory_gib=None, train_images_per_second=0.214)
    assert training.epoch_line(cpu, 40).endswith("| 61.5 s, 0.21 train img/s")


# --------------------------------------------------------------------------- 6. end to end

def check_results(out, script, *, image_size, batch_size, lr, updated, epochs=2):
    name = script.removesuffix(".py")
    document = json.loads((out / f"{name}.json").read_text())
    assert document["script"] == name and document["run_name"] == name
    assert document["status"] == "finished"
    config = document["config"]
    expected = dict(image_size=image_size, batch_size=batch_size, lr=lr, optimizer="Adam",
                    epochs=epochs, seed=0, total_params=TOTAL_B0_100,
                    trainable_params=BN_AFFINE_B0 if name == "bug" else TOTAL_B0_100,
                    updated_params=updated, pretrained="none", dummy=True, device="cpu",
                    torch=str(torch.__version__))
    assert {k: config.get(k) for k in expected} == expected
    assert [e["epoch"] for e in document["epochs"]] == list(range(1, epochs + 1))
    for entry in document["epochs"]:
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                    "train_images_per_second"):
            assert isinstance(entry[key], float) and math.isfinite(entry[key]), (key, entry)
        assert 0 <= entry["train_acc"] <= 100 and 0 <= entry["test_acc"] <= 100
        assert entry["epoch_seconds"] > 0 and entry["train_images_per_second"] > 0
        assert "peak_gpu_memory_gib" in entry and entry["peak_gpu_memory_gib"] is None

    checkpoint = torch.load(out / f"{name}.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "epoch"} <= checkpoint.keys()
    assert checkpoint["epoch"] == epochs
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    model = EfficientNet.from_name("efficientnet-b0", num_classes=100)
    model.load_state_dict(checkpoint["model"], strict=True)
    return document, checkpoint


def assert_parameters(checkpoint, initial, *, updated):
    """The checkpoint's parameters against the model the same flags build (not trained)."""
    state = checkpoint["model"]
    assert initial.keys() <= state.keys()
    same = [n for n in initial if torch.equal(state[n], initial[n])]
    if updated:
        assert same == [], f"never updated: {same[:3]}"
    else:
        assert len(same) == len(initial), "a parameter moved"


def stat(path):
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_end_to_end(build, capsys, tmp_path, script):
    name = script.removesuffix(".py")
    flags = ["--dummy", "--device", "cpu", "--no-pretrained", "--epochs", "2",
             "--limit-train-batches", "2", "--limit-eval-batches", "1", "--workers", "0",
             "--image-size", "32", "--batch-size", "4", "--output-dir", "tmp"]
    result = run_script(script, *flags, cwd=tmp_path, env=offline_env())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "tmp"
    lr, updated = (0.01, 0) if name == "bug" else (0.005, TOTAL_B0_100)
    _, checkpoint = check_results(out, script, image_size=32, batch_size=4, lr=lr,
                                  updated=updated)
    initial = params(build(script, *flags[:-1], tmp_path / "elsewhere").model)
    assert_parameters(checkpoint, initial, updated=bool(updated))

    # the same command again, without --overwrite: refused, nothing touched
    files = [out / f"{name}.json", out / f"{name}.pth"]
    before, listing = [stat(f) for f in files], sorted(p.name for p in out.iterdir())
    if name == "bug":  # as a user sees it
        result = run_script(script, *flags, cwd=tmp_path, env=offline_env())
        assert result.returncode == 2
        assert result.stdout == ""
        error = result.stderr
    else:  # the same check in-process, to save a subprocess
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            build(script, *flags[:-1], out)
        assert exit_.value.code == 2
        error = capsys.readouterr().err
    assert_one_line_error(error, script, "--overwrite", f"{name}.")
    assert [stat(f) for f in files] == before
    assert sorted(p.name for p in out.iterdir()) == listing  # (the files and the run's lock)

    if name == "bug":  # --overwrite replaces the run (once is enough: it is shared code)
        result = run_script(script, *flags, "--overwrite", cwd=tmp_path, env=offline_env())
        assert result.returncode == 0, result.stderr
        check_results(out, script, image_size=32, batch_size=4, lr=lr, updated=updated)
        assert all(stat(f)[1] != b[1] for f, b in zip(files, before))


def test_bug_at_its_real_defaults(build, tmp_path):
    """The report's recipe itself (1024 px, batch 4, lr 0.01): nothing is updated."""
    flags = ["--dummy", "--device", "cpu", "--no-pretrained", "--epochs", "2",
             "--limit-train-batches", "1", "--limit-eval-batches", "1", "--workers", "0"]
    result = run_script("bug.py", *flags, "--output-dir", "tmp", cwd=tmp_path,
                        env=offline_env())
    assert result.returncode == 0, result.stderr
    _, checkpoint = check_results(tmp_path / "tmp", "bug.py", image_size=1024, batch_size=4,
                                  lr=0.01, updated=0)
    b = build("bug.py", *flags, "--output-dir", tmp_path / "elsewhere")
    assert b.args.image_size == 1024 and b.args.batch_size == 4
    assert_parameters(checkpoint, params(b.model), updated=False)
    # while BatchNorm's running statistics did move, one batch per epoch
    state = checkpoint["model"]
    for name, m in bn_modules(b.model).items():
        assert not torch.equal(state[f"{name}.running_mean"], m.running_mean), name
        assert state[f"{name}.num_batches_tracked"].item() == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_with_workers_started_by_spawn(tmp_path, script):
    """macOS and Windows start data-loading workers with spawn, which imports the script
    again in each worker: there it must not run (it would refuse the run's own files, and
    the worker would die). Spawn made the default here by a sitecustomize."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        'import multiprocessing\nmultiprocessing.set_start_method("spawn")\n')
    result = run_script(script, *TINY, "--workers", "1", "--epochs", "1", "--output-dir", "out",
                        cwd=tmp_path, env=offline_env(PYTHONPATH=site), timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    document = json.loads((tmp_path / "out" / f"{script[:-3]}.json").read_text())
    assert document["status"] == "finished" and document["config"]["workers"] == 1


# --------------------------------------------------------------------------- 7. bad input

@pytest.fixture
def weights_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    linear = tmp_path / "linear.pth"
    torch.save(nn.Linear(3, 2).state_dict(), linear)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return dict(missing=tmp_path / "missing.pth", text=text, linear=linear, file=a_file)


BAD_INPUT = [
    (["--epochs", "0"], ["--epochs", "positive"]),
    (["--batch-size", "0"], ["--batch-size", "positive"]),
    (["--limit-train-batches", "0"], ["--limit-train-batches", "positive"]),
    (["--limit-eval-batches", "-1"], ["--limit-eval-batches", "positive"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "-1"], ["--lr", "positive"]),
    (["--lr", "nan"], ["--lr", "positive", "nan"]),
    (["--lr", "inf"], ["--lr", "positive", "inf"]),
    (["--workers", "-1"], ["--workers", "0 or more"]),
    (["--device", "tpu"], ["--device tpu", "cpu"]),
    (["--device", "cuda"], ["CUDA", "--device cpu"]),
    (["--weights", "{missing}"], ["--weights", "missing.pth", "no such file"]),
    (["--weights", "{text}"], ["--weights", "notes.txt", "not a PyTorch state dict"]),
    (["--weights", "{linear}"], ["--weights", "linear.pth", "not an EfficientNet-b0"]),
    (["--data-dir", "{file}"], ["--data-dir", "a_file", "is a file"]),
    (["--lr", "1e38"], ["--lr 1e+38", "at most 1000"]),
    (["--image-size", "0"], ["--image-size", "positive"]),
    (["--seed", "-1"], ["--seed", "0 or more"]),
    (["--run-name", "a/b"], ["--run-name 'a/b'", "plain file name"]),
    (["--run-name", ".hidden"], ["--run-name '.hidden'", "plain file name"]),
    (["--run-name", ""], ["--run-name ''", "plain file name"]),
    (["--output-dir", "{file}"], ["--output-dir", "a_file", "is a file"]),
    (["--weights", "{missing}", "--no-pretrained"], ["--weights and --no-pretrained"]),
]


def case_id(bad):
    return " ".join(bad).replace("{", "").replace("}", "")


def bad_argv(bad, files, out):
    base = ["--dummy", "--device", "cpu", "--workers", "0", "--output-dir", out]
    return base + [a.format(**files) for a in bad]


@pytest.mark.parametrize("bad, fragments", BAD_INPUT, ids=[case_id(b) for b, _ in BAD_INPUT])
def test_bad_input_is_refused(build, capsys, tmp_path, weights_files, bad, fragments):
    if bad == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        build("fixed.py", *bad_argv(bad, weights_files, out))
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "fixed.py", *fragments)
    assert not out.exists()


def test_a_gpu_index_beyond_the_machines_is_refused(build, capsys, tmp_path, monkeypatch):
    """--device cuda:1 on a one-GPU machine (CUDA stubbed: nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exit_:
        build("fixed.py", "--dummy", "--device", "cuda:1", "--output-dir", tmp_path / "out")
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "fixed.py", "--device cuda:1",
                          "1 CUDA device(s)")


SUBPROCESS_BAD = [BAD_INPUT[6], BAD_INPUT[10], BAD_INPUT[12]]  # --lr nan, cuda, a text file


@pytest.mark.parametrize("bad, fragments", SUBPROCESS_BAD,
                         ids=[case_id(b) for b, _ in SUBPROCESS_BAD])
def test_bad_input_reaches_the_user_as_one_line(tmp_path, weights_files, bad, fragments):
    if bad == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    result = run_script("bug.py", *bad_argv(bad, weights_files, out), cwd=tmp_path,
                        env=offline_env())
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "bug.py", *fragments)
    assert result.stdout == ""
    assert not out.exists()


# --------------------------------------------------------------------------- 8. missing resources

@pytest.mark.parametrize("folder", ["empty", "missing", "truncated"])
def test_missing_cifar100_without_network(tmp_path, folder):
    """No CIFAR-100 and no network: one line that says what to download and where. A
    truncated archive (what an interrupted download leaves) is named as such."""
    data, out = tmp_path / folder, tmp_path / "out"
    if folder != "missing":
        data.mkdir()
    if folder == "truncated":
        (data / training.CIFAR_ARCHIVE).write_bytes(b"\x1f\x8b" + bytes(1000))
    result = run_script("fixed.py", "--device", "cpu", "--data-dir", data, "--output-dir", out,
                        cwd=tmp_path, env=offline_env(TORCH_HOME=tmp_path / "home"), timeout=120)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert_one_line_error(result.stderr, "fixed.py", training.CIFAR_ARCHIVE, data, "--dummy")
    assert ("incomplete or corrupt" in result.stderr) == (folder == "truncated")
    assert not out.exists()
    assert data.is_dir() == (folder != "missing")  # the user's folder kept, none left behind


def test_missing_weights_without_network(tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    result = run_script("fixed.py", "--device", "cpu", "--dummy", "--output-dir", out,
                        cwd=tmp_path, env=offline_env(TORCH_HOME=home), timeout=120)
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result.stderr, "fixed.py", WEIGHTS_FILE, home / "hub" / "checkpoints",
                          "--weights")
    assert not out.exists()
