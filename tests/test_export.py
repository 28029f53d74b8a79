"""The JSON beside an exported model is enough to use it: a client that knows nothing of tl,
following the JSON alone, feeds the model what tl feeds it and gets tl's probabilities.

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

from tests.conftest import fit_tiny, tl
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
