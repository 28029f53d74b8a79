"""`tl export`: the exported model predicts like the checkpoint or is not kept, and the JSON
beside it is enough to use it: a client that knows nothing of tl, following the JSON alone,
feeds the model what tl feeds it and gets tl's probabilities.

`tl export` checks the exported model against the checkpoint on tensors tl preprocessed
itself, so a JSON that described the preprocessing wrongly would pass it. The client here is
PIL and NumPy only, and the photos are not square, so a wrong resize side cannot hide.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import csv_rows, fit_tiny, predict_folder, tl
from tl_cli.data.transforms import preprocess

# 80 px at test_efficientnet's crop_pct 0.95: the short side goes to 84. The photos' 4:3 sides
# then scale to whole pixels (112 x 84) and both crop margins are even, so a client's choice of
# rounding for the long side and for the crop offsets cannot matter.
SIZE = 80
PHOTOS = {"landscape.png": (500, 375), "portrait.png": (375, 500), "square.png": (300, 300)}


def _photos(folder: Path) -> list[Path]:
    """Pictures with detail at every scale (blocks, gradients, noise): every resampling shows."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for name, (width, height) in PHOTOS.items():
        blocks = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        base = np.kron(blocks, np.ones((25, 25, 1), dtype=np.uint8))[:height, :width].astype(np.int16)
        ramp = np.linspace(0, 60, width, dtype=np.int16)[None, :, None]
        noise = rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
        picture = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
        Image.fromarray(picture).save(folder / name)
        paths.append(folder / name)
    return paths


def client_input(path: Path, pre: dict) -> np.ndarray:
    """What the JSON's ``preprocessing`` says, step by step: float32 ``[3, H, W]``."""
    assert pre["scale"] == "divide by 255"  # the only scaling this client knows
    image = Image.open(path).convert("RGB")
    width, height = image.size
    short = pre["resize_short_side"]
    if width <= height:
        size = (short, round(height * short / width))
    else:
        size = (round(width * short / height), short)
    image = image.resize(size, resample=Image.Resampling[pre["interpolation"].upper()])
    crop_h, crop_w = pre["center_crop"]
    left, top = (size[0] - crop_w) // 2, (size[1] - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(pre["mean"], dtype=np.float32)) / np.asarray(pre["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)


def test_a_client_following_the_export_json_gets_tls_inputs_and_probabilities(tiny_data, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    best = fit_tiny(tiny_data, 1, "feature_extract.yaml", "--data.image_size", str(SIZE), "--model.head_init", "random")
    model = tmp_path / "model.onnx"
    assert tl("export", "--ckpt_path", best, "--format", "onnx", "-o", model) == 0
    meta = json.loads(model.with_name("model.onnx.json").read_text())
    pre = meta["preprocessing"]
    photos = _photos(tmp_path / "photos")

    # what tl feeds the model: the checkpoint's preprocessing, by tl's own pipeline
    trained = torch.load(best, map_location="cpu", weights_only=False)["tl"]["preprocessing"]
    for path in photos:
        mine = torch.from_numpy(client_input(path, pre))
        assert mine.shape == (3, SIZE, SIZE)
        gap = float((mine - preprocess(path, trained)).abs().max())
        assert gap < 1e-5, f"{path.name}: the JSON's input differs from tl's by up to {gap:.3g}"

    # and what comes out: the exported model on the client's tensors, tl predict on the files
    assert tl("predict", "--ckpt_path", best, "--data.predict_dir", tmp_path / "photos", "-o", "ref") == 0
    with open("ref/latest/predictions.csv") as fh:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(fh)}
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    batch = np.stack([client_input(p, pre) for p in photos])
    probs = session.run(None, {session.get_inputs()[0].name: batch})[0]
    for path, p in zip(photos, probs, strict=True):
        expected = [float(rows[path.name][f"prob_{c}"]) for c in meta["class_names"]]
        gap = float(np.abs(p - expected).max())
        assert gap < 1e-5, f"{path.name}: probabilities differ from tl predict's by up to {gap:.3g}"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_is_checked_and_predicts_like_the_checkpoint(trained, tiny_data, tmp_path, fmt, capsys):
    best = trained / "checkpoints" / "best.ckpt"
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert tl("export", "--ckpt_path", best, "--format", fmt, "-o", out, "--images", tiny_data / "val") == 0
    said = capsys.readouterr().out
    diff = float(said.split("max |difference| of probabilities ")[1].split()[0])
    assert diff <= 1e-4
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["class_names"] == ["ellipses", "rectangles"]
    assert meta["preprocessing"]["center_crop"] == [64, 64] and len(meta["preprocessing"]["mean"]) == 3
    assert tl("export", "--ckpt_path", best, "--format", fmt, "-o", out) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err

    folder = predict_folder(tiny_data, tmp_path)
    # one vocabulary: -o DIR is where results go, for both kinds of prediction
    assert tl("predict", "--model", out, "--data.predict_dir", folder, "-o", tmp_path / "exported") == 0
    assert tl("predict", "--ckpt_path", best, "--data.predict_dir", folder, "--data.num_workers", "0", "-o", "ref") == 0
    exported = {r["file"]: r for r in csv_rows(tmp_path / "exported" / "latest" / "predictions.csv")}
    reference = {r["file"]: r for r in csv_rows("ref/latest/predictions.csv")}
    assert exported.keys() == reference.keys()
    for file, ref in reference.items():
        got = exported[file]
        assert got["predicted"] == ref["predicted"] and got["error"] == ref["error"]
        if ref["predicted"]:
            assert abs(float(got["prob_ellipses"]) - float(ref["prob_ellipses"])) < 1e-4


def test_export_refuses_and_deletes_a_model_that_disagrees(trained, tmp_path, monkeypatch, capsys):
    import tl_cli.export as export_mod

    real = export_mod.ExportedModel.__call__
    monkeypatch.setattr(export_mod.ExportedModel, "__call__", lambda self, x: real(self, x) * 0.9)
    out = tmp_path / "bad.onnx"
    assert tl("export", "--ckpt_path", trained / "checkpoints" / "best.ckpt", "-o", out) == 2
    err = capsys.readouterr().err
    assert "disagrees with the checkpoint" in err and "Nothing was kept" in err
    assert not out.exists() and not out.with_name("bad.onnx.json").exists()


def test_export_check_images_come_from_the_image_files_of_the_folder(tiny_data, tmp_path):
    from tl_cli.export import sample_images

    folder = tmp_path / "sample"
    folder.mkdir()
    for path in sorted((tiny_data / "val" / "ellipses").iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "README.txt").write_text("which photos these are\n")
    prep = {"image_size": [32, 32], "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    batch = sample_images(prep, folder, count=8)
    assert batch.shape == (3, 3, 32, 32)
    assert torch.equal(batch[0], preprocess(sorted(folder.glob("*.jpg"))[0], prep))
