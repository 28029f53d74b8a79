"""A newcomer's first mistakes: each is one paragraph that names the problem and the fix (exit
status 2, no usage dump), and a failed start leaves the run folders as they were."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, TINY, tl

FE = str(CONFIGS / "feature_extract.yaml")

# (name, arguments, the first line of standard error)
MISTAKES = [
    (
        "wrong config path",
        ["fit", "--config", "configs/feature_extrct.yaml"],
        "tl: error: --config configs/feature_extrct.yaml: no such file. Did you mean feature_extract? "
        "Shipped configs (--config NAME): demo, demo_finetune, domain_adapt, feature_extract, finetune; "
        "`tl config show NAME > my.yaml` copies one.",
    ),
    (
        "typo'd model key",
        ["fit", "--config", FE, "--model.backbon", "timm:resnet18"],
        "tl: error: --model.backbon is not a key of FeatureExtraction. Did you mean --model.backbone? "
        "(`tl fit --help` lists the keys)",
    ),
    (
        "typo'd data key",
        ["fit", "--config", FE, "--data.batchsize", "8"],
        "tl: error: --data.batchsize is not a key of ImageFolderData. Did you mean --data.batch_size? "
        "(`tl fit --help` lists the keys)",
    ),
    (
        "typo'd option",
        ["test", "--ckpt_pth", "best.ckpt"],
        "tl: error: tl test has no option --ckpt_pth. Did you mean --ckpt_path? (`tl test --help` lists the keys)",
    ),
    (
        "wrong type",
        ["fit", "--config", FE, "--trainer.max_epochs", "ten"],
        "tl: error: --trainer.max_epochs ten: expected a whole number. (`tl fit --help` lists the keys)",
    ),
    (
        "wrong type in a model key",
        ["fit", "--config", FE, "--model.lr", "fast"],
        "tl: error: --model.lr fast: expected a number or auto. (`tl fit --help` lists the keys)",
    ),
    (
        "a value not among the choices",
        ["fit", "--config", FE, "--data.augment", "randaugmnt"],
        "tl: error: --data.augment randaugmnt: expected one of none, flip, standard, randaugment. "
        "Did you mean randaugment? (`tl fit --help` lists the keys)",
    ),
    (
        "a key of another model class",
        ["fit", "--config", FE, "--model.init_from", "best.ckpt"],
        "tl: error: --model.init_from is a key of FineTune, DomainAdaptation, not of FeatureExtraction (the "
        "model this config picks): add --model FineTune or --model DomainAdaptation, or use the config of "
        "that step (configs/finetune.yaml for FineTune). (`tl fit --help` lists the keys)",
    ),
    (
        "--ckpt_path to a missing file",
        ["test", "--ckpt_path", "runs/feature_extract/latest/checkpoints/best.ckpt"],
        "tl: error: The --ckpt_path checkpoint runs/feature_extract/latest/checkpoints/best.ckpt does not "
        "exist. Pass the path of a .ckpt file written by `tl fit`.",
    ),
    (
        "options before the command",
        ["--config", FE, "fit"],
        "tl: error: --config comes after the command: tl COMMAND --config ... (e.g. tl fit --config "
        "configs/feature_extract.yaml). `tl --help` lists the commands.",
    ),
    (
        "a key before the config that sets it again",
        ["fit", "--model.lr", "0.1", "--config", FE],
        f"tl: error: --model.lr comes before --config {FE}, which sets it again and would win. Put the configs "
        f"first and the keys after them: tl COMMAND --config {FE} ... --model.lr VALUE.",
    ),
    (
        "tl fit without --config",
        ["fit"],
        "tl: error: tl fit needs a config, which picks the model, its callbacks and their settings: tl fit "
        "--config feature_extract --data.root DIR (step 1), then --config finetune (step 2). Shipped configs: "
        "demo, demo_finetune, domain_adapt, feature_extract, finetune (`tl config show NAME`).",
    ),
    (
        "a misspelt command",
        ["fti", "--config", FE],
        "tl: error: Unknown command 'fti'. Did you mean tl fit? `tl --help` lists the commands.",
    ),
    (
        "a misspelt choice of tl's own command",
        ["export", "--ckpt_path", "best.ckpt", "--format", "onx"],
        "tl: error: tl export: argument --format: invalid choice: 'onx' (choose from 'onnx', 'torchscript'). "
        "Did you mean onnx? `tl export --help` says more.",
    ),
]


@pytest.mark.parametrize(("args", "first_line"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_first_mistake_is_one_paragraph_with_the_fix(args, first_line, capsys):
    assert tl(*args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == first_line
    assert "usage:" not in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_a_yaml_syntax_error_names_the_file_and_line(capsys):
    Path("my.yaml").write_text("model:\n  class_path: tl_cli.models.FeatureExtraction\n   init_args:\n    lr: 0.1\n")
    assert tl("fit", "--config", "my.yaml") == 2
    assert capsys.readouterr().err.splitlines() == [
        "tl: error: my.yaml, line 3, column 13: not valid YAML: mapping values are not allowed here. Indent "
        "each key under its section by the same spaces (no tabs) and put a space after every colon."
    ]


def test_a_typo_in_a_config_file_gets_close_matches_too(capsys):
    Path("my.yaml").write_text("data:\n  init_args:\n    batchsize: 8\n")
    assert tl("fit", "--config", FE, "--config", "my.yaml") == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(
        "tl: error: --data.batchsize is not a key of ImageFolderData. Did you mean --data.batch_size?"
    )


def _listing(root: Path) -> list[tuple[str, str]]:
    return sorted((str(p), os.readlink(p) if p.is_symlink() else "") for p in root.rglob("*"))


def test_a_failed_start_leaves_the_run_folders_as_they_were(tiny_data):
    before = Path("runs/feature_extract/version_0")
    before.mkdir(parents=True)
    (before / "config.yaml").write_text("earlier run\n")
    os.symlink("version_0", "runs/feature_extract/latest")
    listing = _listing(Path("runs"))
    assert tl("fit", "--config", FE, *TINY, "--data.root", tiny_data, "--model.backbon", "x") == 2
    assert _listing(Path("runs")) == listing
    assert tl("fit", "--config", FE, *TINY, "--data.root", "nowhere") == 2
    assert _listing(Path("runs")) == listing
    # no runs/ at all before: none after
    assert tl("fit", "--config", FE, *TINY, "--data.root", "nowhere", "-o", "fresh/runs") == 2
    assert not Path("fresh").exists()


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (
            ["predict", "--model", "x.onnx", "--data.predict_dir", ".", "--output", "out/predictions.csv"],
            "tl: error: -o out/predictions.csv names a file, but -o is a folder: tl writes predictions.csv, in "
            "OUTPUT/version_N/ into it. Use -o out.",
        ),
        (
            ["test", "--ckpt_path", "best.ckpt", "-o", "results/metrics.json"],
            "tl: error: -o results/metrics.json names a file, but -o is a folder: tl writes version_N/ run folders "
            "(config.yaml, checkpoints/, metrics.json, predictions.csv ...) into it. Use -o results.",
        ),
        (
            ["export", "--ckpt_path", "best.ckpt", "-o", "model.json"],
            "tl: error: -o model.json names a file, but -o is a folder: tl writes the model (.onnx/.pt) and its "
            ".json (or end -o in .onnx/.pt) into it. Use -o model.",
        ),
    ],
    ids=["predict --model", "test", "export"],
)
def test_an_output_folder_named_like_a_file_is_refused_with_the_fix(args, first_line, capsys):
    assert tl(*args) == 2
    assert capsys.readouterr().err.splitlines() == [first_line]
    assert not Path("out").exists() and not Path("results").exists()


def test_shipped_configs_are_reachable_from_any_folder(capsys):
    assert tl("config", "show", "finetune") == 0
    assert capsys.readouterr().out == (CONFIGS / "finetune.yaml").read_text()
    assert tl("config", "list") == 0
    assert "feature_extract" in capsys.readouterr().out
    from tl_cli.cli.configs import resolve_configs

    assert not Path("configs").exists()  # the test runs in an empty folder
    assert resolve_configs(["--config", "finetune"]) == ["--config", str(CONFIGS / "finetune.yaml")]
    assert resolve_configs(["-c", "configs/finetune.yaml"]) == ["-c", str(CONFIGS / "finetune.yaml")]
    assert "using the shipped finetune.yaml" in capsys.readouterr().err
    assert tl("config", "show", "finetun") == 2
    assert capsys.readouterr().err.startswith(
        "tl: error: No shipped config 'finetun'. Did you mean finetune or demo_finetune?"
    )


def test_a_wheel_installed_elsewhere_gives_tl_and_its_configs(tmp_path):
    """``pip install`` of a wheel (not the checkout): ``tl`` and the shipped configs work from any
    folder. The venv borrows this one's packages (torch, Lightning) without installing any
    (about 7 s on 2 cores)."""
    import shutil
    import site
    import subprocess
    import sys
    import zipfile

    from tests.conftest import REPO

    source = tmp_path / "source"  # built from a copy: nothing lands in the checkout
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for name in ("tl_cli", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source], check=True
    )
    wheel = next((tmp_path / "dist").glob("tl_cli-*.whl"))
    inside = zipfile.ZipFile(wheel).namelist()
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "tl_cli").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= set(inside), "a subpackage is missing from pyproject's list"
    assert {f"tl_cli/configs/{p.name}" for p in CONFIGS.glob("*.yaml")} <= set(inside)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    purelib = next(venv.glob("lib/python*/site-packages"))
    (purelib / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # no .pth inside: no checkout
    subprocess.run([*pip, "--python", venv / "bin" / "python", "install", "--no-deps", "-q", wheel], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def tl_there(*args):
        return subprocess.run([venv / "bin" / "tl", *args], capture_output=True, text=True, cwd=elsewhere, env=env)

    done = tl_there("--help")
    assert done.returncode == 0 and "tl config" in done.stdout
    done = tl_there("config", "show", "finetune")
    assert done.returncode == 0 and done.stdout == (CONFIGS / "finetune.yaml").read_text()
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import tl_cli.cli.configs as c; print(c.shipped_dir())"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
    ).stdout.strip()
    assert Path(where) == purelib / "tl_cli" / "configs"
    # the README's command, from a folder without configs/: the shipped config is read and parsed
    done = tl_there("fit", "--config", "configs/feature_extract.yaml", "--model.backbon", "x")
    assert done.returncode == 2
    assert "using the shipped feature_extract.yaml" in done.stderr
    assert "--model.backbon is not a key of FeatureExtraction. Did you mean --model.backbone?" in done.stderr


# --------------------------------------------------------------------------- reports that say what they are


@pytest.mark.parametrize(("correct", "n"), [(0, 16), (4, 16), (13, 16), (16, 16), (180, 200), (1, 3)])
def test_the_accuracy_interval_is_wilsons(correct, n):
    from scipy.stats import binomtest

    from tl_cli.reports.files import wilson_interval

    reference = binomtest(correct, n).proportion_ci(0.95, method="wilson")
    assert wilson_interval(correct, n) == pytest.approx((reference.low, reference.high), abs=1e-6)


def test_the_chance_level_is_the_majority_class():
    from tl_cli.reports.files import chance_level

    assert chance_level([3, 9, 4], ["a", "b", "c"]) == (pytest.approx(9 / 16), "b")


def test_a_test_report_says_what_it_is_of(tiny_data):
    import json

    from tests.conftest import fit_tiny

    best = fit_tiny(tiny_data, 1)
    assert tl("test", "--ckpt_path", best, "--data.root", tiny_data, "--data.num_workers", "0", "-o", "t") == 0
    metrics = json.loads(Path("t/latest/metrics.json").read_text())
    assert metrics["model"] == {"class": "FeatureExtraction", "backbone": "timm:test_efficientnet", "weights": "none"}
    ckpt = metrics["checkpoint_info"]
    assert ckpt["path"] == str(best) and ckpt["epoch"] == 0 and ckpt["global_step"] > 0
    assert ckpt["run_folder"] == str(Path("runs/feature_extract/version_0").resolve())
    assert metrics["data"] == {
        "root": str(tiny_data),
        "split": "test",
        "images_per_class": {"ellipses": 6, "rectangles": 6},
    }
    import lightning
    import torch

    assert metrics["versions"] == {"tl": "0.1.0", "torch": torch.__version__, "lightning": lightning.__version__}
    assert metrics["date"][:4].isdigit()
    correct = round(metrics["accuracy"] * 12)
    from scipy.stats import binomtest

    ci = binomtest(correct, 12).proportion_ci(0.95, method="wilson")
    assert metrics["accuracy_ci95"] == pytest.approx([ci.low, ci.high])
    assert metrics["chance_accuracy"] == 0.5 and metrics["majority_class"] in ("ellipses", "rectangles")
    page = Path("t/latest/report.html").read_text()
    for text in ("FeatureExtraction", "timm:test_efficientnet", "epoch 0", "version_0", str(tiny_data), "ellipses 6"):
        assert text in page, text
    assert f"{ci.low:.3f} - {ci.high:.3f}" in page and "chance level" in page and torch.__version__ in page


def test_grad_cam_is_drawn_only_for_confident_predictions(tmp_path):
    import torch
    from PIL import Image
    from torch import nn

    from tl_cli.reports.html import explain_threshold, write_report

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (32, 32), (60 * i, 90, 200)).save(paths[-1])
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    target = torch.tensor([0, 0, 1])
    probs = torch.tensor([[0.05, 0.9, 0.03, 0.02], [0.24, 0.26, 0.25, 0.25], [0.8, 0.1, 0.05, 0.05]])
    metrics = {
        "confusion_matrix": [[0, 2, 0, 0], [1, 0, 0, 0], [0] * 4, [0] * 4],
        "n_samples": 3,
        "accuracy": 0.0,
        "balanced_accuracy": 0.0,
        "macro_f1": 0.0,
        **{k: [0.0] * 4 for k in ("precision", "recall", "f1")},
        "support": [2, 1, 0, 0],
    }
    prep = {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear", "crop_pct": 1.0}
    page = write_report(
        tmp_path / "report.html",
        metrics=metrics,
        class_names=list("abcd"),
        paths=paths,
        target=target,
        probs=probs,
        preprocessing=prep,
        model=model,
    ).read_text()
    assert explain_threshold(4) == 0.625 and explain_threshold(2) == 0.75
    # the mistakes, most confident first: 0.90 and 0.80 explained, 0.26 (chance: 0.25) not, and said why
    assert page.count('data-cam="1"') == 2 and page.count('data-cam="0"') == 1
    assert "(0.26)<br><i>no heat map: below 0.62</i>" in page
    assert "at least 0.62, halfway from chance (1/4) to certainty" in page


# --------------------------------------------------------------------------- no noise a user cannot act on


def test_lightnings_sync_dist_advice_is_silenced_for_tls_own_metrics_only():
    import warnings

    from tl_cli.cli.lightning_cli import silence_synced_metric_advice

    advice = "It is recommended to use `self.log({!r}, ..., sync_dist=True)` when logging on epoch level"
    with warnings.catch_warnings(record=True) as caught:
        silence_synced_metric_advice()
        for name in ("val/loss", "train/loss_epoch", "val_target/acc", "test/acc", "mine/score"):
            warnings.warn(advice.format(name), UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [advice.format("mine/score")]


@pytest.mark.slow
def test_a_two_process_cpu_fit_prints_no_sync_dist_advice(tiny_data):
    import subprocess
    import sys

    args = ["fit", "--config", FE, *TINY, "--data.root", str(tiny_data), "--trainer.max_epochs", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "tl_cli.cli", *args, "--trainer.devices", "2", "--trainer.strategy", "ddp"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "All distributed processes registered. Starting with 2 processes" in done.stdout + done.stderr
    assert "sync_dist" not in done.stdout + done.stderr


# --------------------------------------------------------------------------- help a person can use


def test_fit_help_starts_with_what_tl_adds_one_or_two_lines_a_key(capsys):
    assert tl("fit", "--help") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "usage: tl fit --config CONFIG [--data.root DIR] [--KEY VALUE ...] [-o DIR]"
    titles = ["Start and results:", "Data (", "Model (", "Freeze (", "Unfreeze (", "Early stopping (", "Checkpoint ("]
    where = [next(i for i, line in enumerate(lines) if line.startswith(t)) for t in [*titles, "Trainer ("]]
    assert where == sorted(where) and where[0] < 10
    assert any(line.startswith("  -o, --output DIR") for line in lines)
    assert "every Trainer key: tl fit --help trainer" in out
    keys = [i for i, line in enumerate(lines) if line.startswith("  -")]
    for i, j in zip(keys, [*keys[1:], len(lines)], strict=True):
        assert sum(1 for line in lines[i:j] if line.startswith("      ")) <= 1, lines[i]
    assert len(lines) < 130  # it was 859


def test_help_trainer_lists_every_trainer_key(capsys):
    assert tl("fit", "--help", "trainer") == 0
    out = capsys.readouterr().out
    for key in ("max_epochs", "devices", "precision", "gradient_clip_val", "accumulate_grad_batches", "deterministic"):
        assert f"--trainer.{key} " in out, key
    assert "--model." not in out


def test_a_second_help_answers_without_importing_torch(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "TL_CACHE_DIR": str(tmp_path / "cache")}
    first = subprocess.run(
        [sys.executable, "-m", "tl_cli.cli", "fit", "--help"], capture_output=True, text=True, env=env
    )
    assert first.returncode == 0
    code = (
        "import contextlib, io, sys; from tl_cli.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out: main(['fit', '--help'])\n"
        "print('torch' in sys.modules, 'lightning' in sys.modules, out.getvalue() == sys.argv[1])"
    )
    second = subprocess.run([sys.executable, "-c", code, first.stdout], capture_output=True, text=True, env=env)
    assert second.stdout.split() == ["False", "False", "True"], second.stderr[-1000:]


HELP_NAMES_OUTPUTS = [
    (["fit"], "checkpoints/best.ckpt"),
    (["validate"], "metrics.csv"),
    (["test"], "report.html"),
    (["predict"], "predictions.csv"),
    (["lr_find"], "lr_find.png"),
    (["data", "synth"], "OUT/{train,val,test}/<class>/"),
    (["data", "split"], "OUT/{train,val,test}/<class>/"),
    (["data", "check"], "report per split and class"),
    (["export"], "a JSON beside it"),
    (["predict", "--model", "m.onnx"], "predictions.csv goes to OUTPUT/version_N/"),
    (["slurm"], "submits it with sbatch"),
    (["weights", "fetch"], "into the standard cache"),
    (["compare"], "leaderboard.csv"),
    (["sweep"], "leaderboard.csv"),
    (["sweep", "gather"], "leaderboard.csv"),
    (["config", "show"], "on standard output"),
]


@pytest.mark.parametrize(
    ("command", "output"), HELP_NAMES_OUTPUTS, ids=[" ".join(c[:2]) for c, _ in HELP_NAMES_OUTPUTS]
)
def test_every_commands_help_names_its_outputs(command, output, capsys):
    assert tl(*command, "--help") == 0
    assert output in " ".join(capsys.readouterr().out.split())
