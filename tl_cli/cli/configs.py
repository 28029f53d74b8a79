"""The configs tl ships, reachable wherever tl is installed, and ``--config`` values checked
before the parser reads them (a missing file or a YAML syntax error is one paragraph naming the
file and line).

In a checkout they are ``configs/``; a wheel carries the same files as ``tl_cli/configs/``.
``--config finetune`` (a shipped config's name) and ``--config configs/finetune.yaml`` from a
folder without that file both mean the shipped file. No torch import.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from tl_cli.cli.mistakes import CommandParser, close_matches, did_you_mean
from tl_cli.errors import TLError

_PACKAGE = Path(__file__).resolve().parents[1]


def shipped_dir() -> Path:
    """The folder of the shipped configs: the wheel's ``tl_cli/configs``, else the checkout's
    ``configs/``."""
    installed = _PACKAGE / "configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "configs"


def shipped() -> dict[str, Path]:
    """Name (file stem) -> path of every shipped config."""
    return {p.stem: p for p in sorted(shipped_dir().glob("*.yaml"))}


def config_path(value: str) -> str:
    """The file a ``--config`` value names: the path itself when it exists; else the shipped
    config of that name (``finetune``, ``configs/finetune.yaml``); else a `TLError` with the
    close matches. The file's YAML is checked too."""
    path = Path(value)
    if not path.is_file():
        found = shipped()
        name = path.stem if path.suffix in (".yaml", ".yml") else path.name
        if name not in found or path.is_dir():
            local = {p.stem: str(p) for p in path.parent.glob("*.y*ml")}
            matches = [local.get(m, m) for m in close_matches(name, {*local, *found})]
            hint = f" Did you mean {' or '.join(matches)}?" if matches else ""
            raise TLError(
                f"--config {value}: no such file.{hint} "
                f"Shipped configs (--config NAME): {', '.join(found)}; `tl config show NAME > my.yaml` copies one."
            )
        path = found[name]
    check_yaml(path)
    return str(path)


def check_yaml(path: Path) -> None:
    """A `TLError` naming the file, line and column when `path` is not valid YAML."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise TLError(f"--config {path}: cannot be read ({exc.strerror}).") from None
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise TLError(
            f"{where}: not valid YAML: {detail}. Indent each key under its section by the same spaces "
            "(no tabs) and put a space after every colon."
        ) from None


def resolve_configs(argv: list[str]) -> list[str]:
    """`argv` with every ``--config``/``-c`` value replaced by the file it names (`config_path`).

    A config given after a key it sets again is refused: the later one wins, so the key the
    user typed would be lost without a word."""
    out: list[str] = []
    typed: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        if value is None and arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is None:
            if arg.startswith("--") and "." in arg:
                typed.setdefault(_user_key(arg[2:].split("=", 1)[0]), arg.split("=", 1)[0])
            out.append(arg)
            i += 1
            continue
        path = config_path(value)
        if path != value and not Path(value).is_file() and ("/" in value or Path(value).suffix):
            print(f"tl: {value} is not here; using the shipped {Path(path).name} ({path})", file=sys.stderr)
        overridden = [typed[k] for k in config_keys(Path(path)) if k in typed]
        if overridden:
            raise TLError(
                f"{overridden[0]} comes before --config {value}, which sets it again and would win. Put the "
                f"configs first and the keys after them: tl COMMAND --config {value} ... {overridden[0]} VALUE."
            )
        out += [arg, path] if arg in ("-c", "--config") else [f"--config={path}"]
        i += 2 if arg in ("-c", "--config") else 1
    return out


def _user_key(key: str) -> str:
    return ".".join(p for p in key.split(".") if p not in ("init_args", "dict_kwargs"))


def config_keys(path: Path) -> set[str]:
    """The keys a config sets, as a user writes them on the command line (``model.lr``)."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    keys: set[str] = set()
    if not isinstance(data, dict):
        return keys
    for section, value in data.items():
        if isinstance(value, dict):
            inner = value.get("init_args") if isinstance(value.get("init_args"), dict) else value
            keys |= {f"{section}.{k}" for k in inner if k != "class_path"}
        else:
            keys.add(str(section))
    return keys


def config_command(argv: list[str]) -> int:
    """``tl config list`` / ``tl config show NAME``: the shipped configs."""
    parser = CommandParser(
        prog="tl config",
        description="The configs tl ships. `tl config show finetune > my.yaml` copies one to edit; "
        "`--config finetune` uses the shipped file directly.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the shipped configs and where they are")
    show = sub.add_parser(
        "show",
        help="print a shipped config",
        description="Print a shipped config, as YAML on standard output: `tl config show finetune > my.yaml`.",
    )
    show.add_argument("name", help="a shipped config's name, e.g. finetune")
    args = parser.parse_args(argv)
    found = shipped()
    if args.command == "list":
        for name, path in found.items():
            print(f"{name:<18} {path}")
        return 0
    path: Optional[Path] = found.get(Path(args.name).stem)
    if path is None:
        raise TLError(f"No shipped config {args.name!r}.{did_you_mean(args.name, found)} Shipped: {', '.join(found)}.")
    sys.stdout.write(path.read_text())
    return 0


def config_type(value: str) -> Path:
    """argparse type of the ``-c/--config`` options of tl's own commands (`config_path`)."""
    return Path(config_path(value))
