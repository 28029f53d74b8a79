"""Checkpoints: a checkpoint names its class, and test/validate/predict/export rebuild it from the
file alone; checkpoints written before the classes existed (tl 0.1.0 at commit 7dd34d2, in
tests/data_legacy/, optimizer states stripped) still load; fine-tuning starts from the weights
it is given; a file that is no tl checkpoint, or one from the future, is explained, and loading
one never runs its code."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.helpers import CONFIGS, TINY, fit_tiny, quiet_trainer, tiny_datamodule, tl
from tl_cli.models import FineTune, load_model

LEGACY = Path(__file__).parent / "data_legacy"
KINDS = {"feature_extract": "FeatureExtraction", "finetune": "FineTune", "domain_adapt": "DomainAdaptation"}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_legacy_checkpoints_load_as_their_class_and_evaluate(name, tiny_data, capsys):
    ckpt = LEGACY / f"{name}.ckpt"
    assert "_class_path" not in torch.load(ckpt, weights_only=True)["hyper_parameters"]
    model = load_model(ckpt)
    assert type(model).__name__ == KINDS[name]
    assert tl("test", "--ckpt_path", ckpt, "--data.root", tiny_data, "--data.num_workers", "0", "-o", name) == 0
    assert f"a {KINDS[name]} checkpoint" in capsys.readouterr().out
    metrics = json.loads(Path(f"{name}/latest/metrics.json").read_text())
    assert metrics["n_samples"] == 12 and metrics["classes"] == ["ellipses", "rectangles"]
    # the rebuilt model is the one that was trained (an old DANN's domain classifier, which
    # evaluation never uses, had another layout: it is left out)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    used = {k: v for k, v in model.state_dict().items() if not k.startswith("domain_classifier.")}
    assert used and all(torch.equal(v, state[k]) for k, v in used.items())
    assert tl("export", "--ckpt_path", ckpt, "-o", f"{name}.onnx") == 0


def test_each_class_round_trips_through_its_checkpoint(tiny_data, tmp_path, capsys):
    fe = fit_tiny(tiny_data, 1)
    ft = fit_tiny(tiny_data, 1, "finetune.yaml", "--model.init_from", fe)
    for path, kind in ((fe, "FeatureExtraction"), (ft, "FineTune")):
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["hyper_parameters"]["_class_path"].endswith(kind) and ckpt["tl"]["class_path"].endswith(kind)
        assert type(load_model(path)).__name__ == kind
        assert tl("validate", "--ckpt_path", path, "--data.root", tiny_data, "--data.num_workers", "0") == 0
        assert f"a {kind} checkpoint" in capsys.readouterr().out
    # predict needs nothing but the checkpoint and a folder
    assert tl("predict", "--ckpt_path", ft, "--data.predict_dir", tiny_data / "val", "--data.num_workers", "0") == 0


def test_resuming_with_another_class_is_refused(tiny_data, capsys):
    fe = fit_tiny(tiny_data, 1)
    last = fe.with_name("last.ckpt")
    args = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, "--data.root", tiny_data, "--ckpt_path", last]
    assert tl(*args) == 2
    assert "Resume with the config that wrote the checkpoint" in capsys.readouterr().err


def test_a_class_path_in_a_file_never_imports_code(tiny_data, tmp_path, capsys):
    ckpt = torch.load(LEGACY / "feature_extract.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "evil_module_that_does_not_exist.Model"
    torch.save(ckpt, tmp_path / "odd.ckpt")
    assert tl("test", "--ckpt_path", tmp_path / "odd.ckpt", "--data.root", tiny_data) == 2
    assert "tl does not import code named by a file" in capsys.readouterr().err


def test_resuming_under_a_new_monitor_says_the_best_checkpoint_and_patience_start_over(tiny_data, caplog):
    """Lightning skips a callback state saved under other settings without a word (tl's CLI
    filters its generic warning); a user who changed the monitor must learn that the best
    checkpoint and early stopping's patience restart, and one who did not must hear nothing."""
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", tiny_data]
    assert tl(*args, "--trainer.max_epochs", "1", "-o", "first") == 0
    last = Path("first/latest/checkpoints/last.ckpt")
    caplog.set_level(logging.INFO)  # Lightning's rank-zero messages: its logger, not stdout, under pytest
    assert tl(*args, "--trainer.max_epochs", "2", "-o", "same", "--ckpt_path", last) == 0
    assert "Restored all states" in caplog.text and "other settings" not in caplog.text
    caplog.clear()
    new = ["--checkpoint.monitor", "val/acc", "--checkpoint.mode", "max", "--early_stopping.monitor", "val/acc"]
    new += ["--early_stopping.mode", "max"]
    assert tl(*args, *new, "--trainer.max_epochs", "2", "-o", "moved", "--ckpt_path", last) == 0
    said = caplog.text
    assert "checkpoint.monitor val/loss -> val/acc, checkpoint.mode min -> max): the best checkpoint" in said, said
    assert "early_stopping.monitor val/loss -> val/acc, early_stopping.mode min -> max): early stopping" in said
    best = torch.load("moved/latest/checkpoints/best.ckpt", weights_only=True)
    (state,) = [v for k, v in best["callbacks"].items() if k.startswith("BestAndLast")]
    assert state["monitor"] == "val/acc" and best["epoch"] == 1


@pytest.mark.slow
def test_fine_tuning_starts_from_the_feature_extraction_weights(tiny_data, tmp_path):
    best = fit_tiny(tiny_data)
    state = torch.load(best, weights_only=True)["state_dict"]
    model = FineTune(backbone="timm:test_efficientnet", weights="none", init_from=str(best))
    trainer = quiet_trainer(0, tmp_path)
    trainer.fit(model, tiny_datamodule(tiny_data))  # max_epochs=0: only the start hooks run
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_clear_errors_for_bad_checkpoints_and_mismatched_classes(tiny_data, tmp_path, capsys):
    (tmp_path / "notes.ckpt").write_text("hello")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    fix = "a .ckpt file written by `tl fit`"
    for name in ("notes.ckpt", "empty.ckpt"):
        assert tl("test", "--ckpt_path", tmp_path / name, "--data.root", tiny_data) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / name} is not a loadable PyTorch checkpoint" in err and fix in err
        assert "Traceback" not in err and ("(an empty file)" in err) == (name == "empty.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    assert tl("test", "--ckpt_path", tmp_path / "plain.ckpt", "--data.root", tiny_data) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'plain.ckpt'} is a PyTorch file but not a tl checkpoint" in err and fix in err
    assert tl("test", "--ckpt_path", tmp_path / "missing.ckpt") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing.ckpt'} does not exist" in err and fix in err
    assert (tmp_path / "notes.ckpt").read_text() == "hello" and (tmp_path / "empty.ckpt").stat().st_size == 0

    best = fit_tiny(tiny_data)
    other = tmp_path / "other"
    (other / "test" / "cats").mkdir(parents=True)
    (other / "test" / "dogs").mkdir(parents=True)
    for d in ("cats", "dogs"):
        for p in list((tiny_data / "test" / "ellipses").iterdir())[:2]:
            (other / "test" / d / p.name).write_bytes(p.read_bytes())
    assert tl("test", "--ckpt_path", best, "--data.root", other, "--data.num_workers", "0") == 2
    err = capsys.readouterr().err
    assert "missing class folder(s) ellipses, rectangles" in err and "Traceback" not in err


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoints_are_loaded_without_running_their_code(tiny_data, tmp_path, capsys):
    with open(tmp_path / "evil.ckpt", "wb") as fh:
        pickle.dump({"state_dict": Boom(), "tl": {"format": 1}}, fh)
    commands = (["test", "--data.root", tiny_data], ["predict", "--data.predict_dir", tiny_data], ["export"])
    for command in commands:
        assert tl(command[0], "--ckpt_path", tmp_path / "evil.ckpt", *command[1:]) == 2
        assert f"{tmp_path / 'evil.ckpt'} is not a loadable PyTorch checkpoint" in capsys.readouterr().err, command
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_incompatible_checkpoint_version_is_explained(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["tl"]["format"] = 99
    torch.save(ckpt, tmp_path / "future.ckpt")
    assert tl("export", "--ckpt_path", tmp_path / "future.ckpt") == 2
    assert "format 99" in capsys.readouterr().err
