"""The model's contract is readable in one place: every Lightning hook is defined in `Classifier`
(or extended by a subclass through ``super()``), the mixins define none and declare what they
read from the model, hook overrides are marked ``@override``, and the starting point talks to
the checkpoint callback through its public methods only."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.hooks import CheckpointHooks, DataHooks, ModelHooks

from tl_cli.callbacks.checkpoint import BestAndLast
from tl_cli.models import Classifier, DomainAdaptation, FeatureExtraction, FineTune
from tl_cli.models.starting_point import ModelWithStart

MODELS = [Classifier, FeatureExtraction, FineTune, DomainAdaptation]
HOOKS = {
    name
    for klass in (ModelHooks, DataHooks, CheckpointHooks)
    for name, value in vars(klass).items()
    if callable(value) and not name.startswith("_")
} | {
    "forward",
    "training_step",
    "validation_step",
    "test_step",
    "predict_step",
    "configure_callbacks",
    "configure_optimizers",
    "configure_gradient_clipping",
    "lr_scheduler_step",
    "optimizer_step",
    "optimizer_zero_grad",
    "backward",
}
# Overrides that replace the base class's hook on purpose (they do not call super()).
REPLACED = {("DomainAdaptation", "training_step"): "its batch holds a source and a target batch"}
MODELS_DIR = Path(__file__).resolve().parents[1] / "tl_cli" / "models"


def _tl_classes(model: type) -> list[type]:
    return [k for k in model.__mro__ if k.__module__.startswith("tl_cli.")]


def _mixins() -> list[type]:
    return [k for k in _tl_classes(DomainAdaptation) if not issubclass(k, pl.LightningModule)]


def _calls_super(klass: type, name: str) -> bool:
    tree = ast.parse(textwrap.dedent(inspect.getsource(vars(klass)[name])))
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == name
        and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "id", None) == "super"
        for node in ast.walk(tree)
    )


def test_no_mixin_defines_a_hook_or_anything_else_a_lightning_module_has():
    """Then the order of Classifier's base classes cannot change which code runs."""
    clashes = [
        f"{k.__name__}.{name}"
        for k in _mixins()
        for name in vars(k)
        if not name.startswith("__") and hasattr(pl.LightningModule, name)
    ]
    assert not clashes, clashes
    # and no two mixins define the same name (which one wins would depend on the order too)
    seen: dict[str, str] = {}
    for k in _mixins():
        for name in [n for n in vars(k) if not n.startswith("__")]:
            assert name not in seen, f"{name} in both {seen[name]} and {k.__name__}"
            seen[name] = k.__name__


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_each_hook_is_defined_once_or_extended_through_super(model):
    for hook in sorted(HOOKS):
        defining = [k for k in _tl_classes(model) if hook in vars(k)]
        for klass in defining[:-1]:  # every definition but the most basic one extends it
            assert _calls_super(klass, hook) or (klass.__name__, hook) in REPLACED, (
                f"{klass.__name__}.{hook} overrides {defining[-1].__name__}.{hook} without calling super()"
            )
        assert all(k is Classifier or issubclass(k, Classifier) for k in defining), (hook, defining)


@pytest.mark.parametrize("klass", [*MODELS, BestAndLast], ids=lambda k: k.__name__)
def test_every_override_of_lightning_is_marked_override(klass):
    base = ModelCheckpoint if klass is BestAndLast else pl.LightningModule
    unmarked = [
        name
        for name, value in vars(klass).items()
        if inspect.isfunction(value)
        and not name.startswith("__")
        and hasattr(base, name)
        and not getattr(value, "__override__", False)
    ]
    assert not unmarked, unmarked


def test_mixins_declare_what_they_read_from_the_model_and_the_model_sets_it():
    model = DomainAdaptation(backbone="timm:test_resnet", weights="none", class_names=["a", "b"], bottleneck=8)
    for mixin in _mixins():
        tree = ast.parse(textwrap.dedent(inspect.getsource(mixin)))
        used = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
        }
        declared = set(vars(mixin)) | set(vars(mixin).get("__annotations__", {}))
        undeclared = sorted(n for n in used - declared if not hasattr(pl.LightningModule, n))
        assert not undeclared, f"{mixin.__name__} reads {undeclared} without declaring them"
        missing = [n for n in vars(mixin).get("__annotations__", {}) if not hasattr(model, n)]
        assert not missing, f"{mixin.__name__} declares {missing}, which the model does not set"
    for name in [n for n in dir(ModelWithStart) if not n.startswith("_")] + list(ModelWithStart.__annotations__):
        assert hasattr(Classifier, name), f"the model lacks {name}, which StartingPoint needs"


def test_the_models_read_no_attribute_of_their_own_by_getattr():
    for path in MODELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
                target = node.args[0]
                assert not (isinstance(target, ast.Name) and target.id == "self"), f"{path.name}:{node.lineno}"


def test_the_starting_point_uses_only_the_public_api_of_the_checkpoint_callback(tmp_path):
    callback = BestAndLast(dirpath=tmp_path, monitor="val/loss", filename="best")
    tree = ast.parse((MODELS_DIR / "starting_point.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            assert getattr(node.func, "id", None) not in ("getattr", "setattr", "hasattr"), node.lineno
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "callback":
            assert isinstance(node.ctx, ast.Load), f"line {node.lineno} writes callback.{node.attr}"
            assert not node.attr.startswith("_") and hasattr(callback, node.attr), node.attr
