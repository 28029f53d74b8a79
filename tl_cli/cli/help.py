"""``tl COMMAND --help`` for Lightning's commands: what tl adds first (config, output, data,
model, the callback sections), each key in one or two lines, then the Trainer keys most runs
set and where the rest are (``--help trainer``; ``--help all`` for jsonargparse's own listing).

The text comes from the classes' signatures and docstrings (as jsonargparse reads them), which
needs torch and Lightning imported; it is kept in the cache folder, keyed by tl's source files
and the installed versions, so a second ``--help`` answers without importing either.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import textwrap
from pathlib import Path
from typing import Any, Optional

from tl_cli.cli.configs import shipped

WIDTH = 110

#: what each command writes (its run folder under -o DIR, default runs/<config name>/)
OUTPUTS = {
    "fit": "DIR/version_N/: config.yaml, checkpoints/best.ckpt and last.ckpt, metrics.csv, logs, curves.svg; "
    "DIR/latest: the newest complete run",
    "validate": "DIR/version_N/: config.yaml, metrics.csv (val/loss, val/acc, ...)",
    "test": "DIR/version_N/: metrics.json, report.html, confusion_matrix.png, mistakes.png, predictions.csv "
    "(target/: the same for the target domain)",
    "predict": "DIR/version_N/predictions.csv: file, predicted class, one probability column per class",
    "lr_find": "DIR_lr_find/version_N/: lr_find.json and lr_find.png (loss against learning rate)",
}
WHAT = {
    "fit": "Train a model: feature extraction, fine-tuning or domain adaptation, as the config picks.",
    "validate": "Evaluate a checkpoint on data.root/val (the model is rebuilt from --ckpt_path).",
    "test": "Evaluate a checkpoint on data.root/test: metrics, confusion matrix, report.html.",
    "predict": "Classify the images of data.predict_dir with a checkpoint.",
    "lr_find": "Suggest a learning rate for a config: train briefly with a growing learning rate.",
}
#: the Trainer keys most runs set, listed in the short help
TRAINER_KEYS = ("max_epochs", "accelerator", "devices", "num_nodes", "strategy", "precision", "logger")
#: the keys of Lightning's callbacks the short help lists (tl's own are all listed)
CALLBACK_KEYS = {
    "early_stopping": ("monitor", "mode", "patience", "min_delta"),
    "checkpoint": ("monitor", "mode", "select", "tie_break", "write_every_s"),
}
#: keys tl fills in itself (from a checkpoint), not a user
HIDDEN = {"class_names", "preprocessing"}
MODELS = ("FeatureExtraction", "FineTune", "DomainAdaptation")


def _clean(text: str) -> str:
    text = " ".join(text.split())
    return text.replace("``", "`")


def _type_text(tp: Any) -> str:
    """A type as a user writes its values: ``none|flip``, ``float|auto``, ``int``."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return "|".join(dict.fromkeys(_type_text(a) for a in args if a is not type(None)))
    if origin is not None:
        return getattr(origin, "__name__", "VALUE")
    if isinstance(tp, type) and tp not in (inspect.Parameter.empty, typing.Any):
        return tp.__name__
    return "VALUE"


def signature_keys(cls: type) -> list[tuple[str, Any, Any, str]]:
    """(name, annotation, default, description) of each constructor argument of `cls` and of the
    bases it passes ``**kwargs`` on to, the class's own first, deprecated ones left out."""
    import typing

    import docstring_parser

    keys: list[tuple[str, Any, Any, str]] = []
    seen: set[str] = set()
    chain = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        chain.append(klass)
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(klass.__init__).parameters.values()):
            break
    docs: dict[str, str] = {}
    for klass in chain:
        for text in (klass.__doc__, klass.__init__.__doc__):
            for param in docstring_parser.parse(text or "").params:
                docs.setdefault(param.arg_name, _clean(param.description or ""))
    for klass in chain:
        try:
            hints = typing.get_type_hints(klass.__init__)
        except Exception:  # an annotation that does not evaluate: shown as VALUE
            hints = {}
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in ("self", *seen, *HIDDEN):
                continue
            seen.add(name)
            doc = docs.get(name, "")
            if not doc.lower().startswith(("deprecated", "the old name")):
                keys.append((name, hints.get(name, param.annotation), param.default, doc))
    return keys


def _key_line(option: str, annotation: Any, default: Any, doc: str) -> list[str]:
    shown = "" if default is inspect.Parameter.empty else f" (default {'null' if default is None else default})"
    head = f"  {option} {_type_text(annotation)}{shown}"
    lines = textwrap.wrap(f"{head}: {doc}" if doc else head, WIDTH, subsequent_indent="      ")
    if len(lines) > 2:
        lines = [lines[0], lines[1][: WIDTH - 1].rstrip() + "…"]
    return lines


def section(title: str, prefix: str, keys: list[tuple[str, Any, Any, str]], only: tuple[str, ...] = ()) -> list[str]:
    """A titled block of ``--prefix.key`` lines (`only`: these keys, in this order)."""
    if only:
        by_name = {k[0]: k for k in keys}
        keys = [by_name[name] for name in only if name in by_name]
    out = ["", *textwrap.wrap(title, WIDTH, subsequent_indent="    ")]
    for name, annotation, default, doc in keys:
        out += _key_line(f"--{prefix}.{name}", annotation, default, doc)
    return out


def _resolve(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def model_order(keys: list[tuple[str, Any, Any, str]], own: int) -> list[tuple[str, Any, Any, str]]:
    """The subclass's own keys (the first `own`) right after what the model starts from
    (backbone, weights): the order a user sets them."""
    base = keys[own:]
    cut = next((i + 1 for i, k in enumerate(base) if k[0] == "weights"), 0)
    return base[:cut] + keys[:own] + base[cut:]


def build(command: str, model: str, topic: str) -> str:
    """The help text (imports the classes it describes)."""
    from tl_cli.cli.lightning_cli import CALLBACK_SECTIONS
    from tl_cli.cli.trainer import TLTrainer

    if topic == "trainer":
        lines = [f"Lightning's Trainer keys of tl {command} (--trainer.KEY VALUE, or trainer: in a config):"]
        lines += section("", "trainer", signature_keys(TLTrainer))[1:]
        return "\n".join(lines)
    configs = ", ".join(shipped())
    lines = [
        f"usage: tl {command} "
        + ("--config CONFIG [--data.root DIR] [--KEY VALUE ...] [-o DIR]" if command in ("fit", "lr_find") else "")
        + ("--ckpt_path CKPT [--data.root DIR] [--KEY VALUE ...] [-o DIR]" if command in ("validate", "test") else "")
        + ("--ckpt_path CKPT --data.predict_dir DIR [-o DIR]" if command == "predict" else ""),
        "",
        WHAT[command],
        "Keys come from the configs (later ones win), then from the command line; a config holds the same keys.",
        "",
        "Start and results:",
        *textwrap.wrap(
            f"  -c, --config FILE|NAME: a YAML config, or a shipped one by name ({configs}); several stack",
            WIDTH,
            subsequent_indent="      ",
        ),
        *textwrap.wrap(
            f"  -o, --output DIR (default runs/<config name>): {OUTPUTS[command]}",
            WIDTH,
            subsequent_indent="      ",
        ),
        "  --ckpt_path PATH: "
        + ("resume this checkpoint (last.ckpt of an interrupted run)" if command == "fit" else "the checkpoint to use"),
    ]
    from tl_cli.data.module import ImageFolderData

    lines += section("Data (--data.KEY; tl_cli.data.ImageFolderData):", "data", signature_keys(ImageFolderData))
    cls = _resolve(f"tl_cli.models.{model}") if "." not in model else _resolve(model)
    keys = signature_keys(cls)
    own = len([k for k in keys if k[0] not in {b[0] for b in signature_keys(cls.__mro__[1])}]) if cls.__mro__[1] else 0
    others = " | ".join(m for m in MODELS if m != cls.__name__)
    lines += section(
        f"Model (--model.KEY; {cls.__module__.rpartition('.')[0]}.{cls.__name__}; another: --model {others}):",
        "model",
        model_order(keys, own),
    )
    if command in ("fit", "lr_find"):
        for key, callback, text in CALLBACK_SECTIONS:
            more = f"; more: tl {command} --help all" if key in CALLBACK_KEYS else ""
            title = f"{key.replace('_', ' ').capitalize()} (--{key}.KEY; --{key} null: none{more}): {text}"
            lines += section(title + ":", key, signature_keys(callback), only=CALLBACK_KEYS.get(key, ()))
    lines += section(
        f"Trainer (the keys most runs set; every Trainer key: tl {command} --help trainer):",
        "trainer",
        signature_keys(TLTrainer),
        only=TRAINER_KEYS,
    )
    lines += ["", f"Every option in jsonargparse's own format: tl {command} --help all"]
    return "\n".join(lines)


def _fingerprint(command: str, model: str, topic: str) -> str:
    from importlib import metadata

    digest = hashlib.sha1(f"{command} {model} {topic}".encode())
    for dist in ("lightning", "jsonargparse", "torch", "timm"):
        try:
            digest.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            pass
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(package)} {stat.st_mtime_ns} {stat.st_size}".encode())
    for path in shipped().values():
        digest.update(f"{path.name} {path.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def help_text(command: str, model: str, topic: str = "") -> str:
    """The help of ``tl COMMAND`` for `model`, from the cache when tl and its libraries are the
    ones that wrote it."""
    folder = Path(os.environ.get("TL_CACHE_DIR") or Path.home() / ".cache" / "tl") / "help"
    path = folder / f"{command}-{model}-{topic or 'keys'}-{_fingerprint(command, model, topic)}.txt"
    try:
        return path.read_text()
    except OSError:
        pass
    text = build(command, model, topic)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the help is just not kept
    return text


def configured_model(args: list[str]) -> str:
    """The model class a help request is about: ``--model NAME``, else the last config's, else
    FeatureExtraction."""
    import yaml

    name = "FeatureExtraction"
    for i, arg in enumerate(args[:-1]):
        if arg in ("--config", "-c"):
            try:
                model = (yaml.safe_load(Path(args[i + 1]).read_text()) or {}).get("model") or {}
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if isinstance(model, dict) and model.get("class_path"):
                name = model["class_path"].rpartition(".")[2]
        if arg == "--model" and not args[i + 1].startswith("-"):
            return args[i + 1].rpartition(".")[2]
    return name


def wanted(args: list[str]) -> Optional[str]:
    """The help topic `args` asks for: ``keys`` (``--help``), ``trainer`` (``--help trainer``);
    None when they ask for none, or for jsonargparse's own (``--help all``, ``--model.help X``)."""
    for i, arg in enumerate(args):
        if arg in ("-h", "--help"):
            nxt = args[i + 1] if i + 1 < len(args) else ""
            if nxt == "all" or any(a.endswith(".help") for a in args):
                return None
            return "trainer" if nxt == "trainer" else "keys"
    return None
