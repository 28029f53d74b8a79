"""First mistakes on the command line, answered in one paragraph: a misspelt key or command
with its close matches, a value of the wrong type with what the key takes, a key of another
model class with the class that has it. jsonargparse's own messages (a usage dump, then a Union
error that names no fix) become these; nothing here imports torch or Lightning.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import NoReturn

from tl_cli.errors import TLError

#: the model classes a user picks with ``--model NAME``
MODEL_CLASSES = ("FeatureExtraction", "FineTune", "DomainAdaptation")


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The choices a misspelt `word` most likely meant (difflib, best first)."""
    return difflib.get_close_matches(word, sorted(set(choices)), n=n, cutoff=0.6)


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """`` Did you mean X?`` (or ``X or Y``) for a misspelt `word`; empty when nothing is close."""
    found = close_matches(word, choices)
    return f" Did you mean {' or '.join(prefix + m for m in found)}?" if found else ""


def class_keys(class_path: str) -> set[str]:
    """The constructor arguments of the class at `class_path`, its bases' included (the keys a
    config may set under it)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return set()
    if hasattr(cls, "argument_names"):
        return set(cls.argument_names())
    keys: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(klass.__init__).parameters
            keys |= {p for p in params if p not in ("self", "args", "kwargs")}
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                break
    return keys


def _models_with(key: str) -> list[str]:
    return [name for name in MODEL_CLASSES if key in class_keys(f"tl_cli.models.{name}")]


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)")
_EXPECTED = re.compile(r"Expected an? (.+?)(?:\. Got value: (.*))?$")
_GIVEN = re.compile(r"Given value: (.*)$")
_REQUIRED = re.compile(r'Key "([^"]+)" is required')
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)$")


def _type_words(expected: list[str]) -> str:
    words = []
    for text in expected:
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
        if literal:
            words += [v.strip().strip("'\"") for v in literal.group(1).split(",")]
            continue
        simple = re.fullmatch(r"<class '(?:builtins\.)?([\w.]+)'>", text)
        name = simple.group(1).rpartition(".")[2] if simple else text
        words.append(
            {"NoneType": "null", "int": "a whole number", "float": "a number", "bool": "true or false"}.get(name, name)
        )
    words = list(dict.fromkeys(words))
    return " or ".join(words) if len(words) < 3 else f"one of {', '.join(words)}"


def explain(message: str, command: str, options: Iterable[str] = ()) -> str:
    """One paragraph for a jsonargparse error `message` of ``tl COMMAND`` (`options`: the
    command's option strings, for close matches)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = " ".join(lines)
    help_hint = f"(`tl {command} --help` lists the keys)"
    unrecognized = _UNRECOGNIZED.search(lines[0]) if lines else None
    if unrecognized:
        word = unrecognized.group(1).split()[0]
        flag = word.split("=", 1)[0]
        if not flag.startswith("-"):
            return (
                f"tl {command} takes options, not {word!r}: write keys as --section.key VALUE "
                f"(e.g. --data.root {word}). {help_hint}"
            )
        return f"tl {command} has no option {flag}.{did_you_mean(flag, options)} {help_hint}"
    required = _REQUIRED.search(text)
    if required:
        key = _user_key(required.group(1), command)
        return f"--{key} is required: set it in a config or on the command line. {help_hint}"
    keys = [k for k in _PARSER_KEY.findall(text)]
    class_path = next(iter(_CLASS_PATH.findall(text)), None)
    section = keys[0].split(".")[0] if keys else ""
    dotted = ".".join(_user_key(k, command) for k in keys)
    refused = _NOT_ACCEPTED.search(text)
    if refused and class_path:
        key = refused.group(1)
        name = class_path.rpartition(".")[2]
        known = class_keys(class_path)
        where = f"--{section}.{key}"
        others = _models_with(key) if section == "model" else []
        if others:
            picks = " or ".join(f"--model {o}" for o in others)
            return (
                f"{where} is a key of {', '.join(others)}, not of {name} (the model this config picks): "
                f"add {picks}, or use the config of that step (configs/finetune.yaml for FineTune). {help_hint}"
            )
        return f"{where} is not a key of {name}.{did_you_mean(key, known, prefix=f'--{section}.')} {help_hint}"
    expected = [m.group(1) for line in lines if (m := _EXPECTED.search(line))]
    given = next((m.group(2) for line in lines if (m := _EXPECTED.search(line)) and m.group(2) is not None), None)
    if given is None:
        given = next((m.group(1) for line in lines if (m := _GIVEN.search(line))), None)
    expected = [e for e in expected if e != "<class 'NoneType'>"] or expected
    if expected and dotted:
        literal = [
            v.strip().strip("'\"")
            for e in expected
            if (m := re.fullmatch(r"typing\.Literal\[(.*)\]", e))
            for v in m.group(1).split(",")
        ]
        value = f" {given}" if given is not None else ""
        hint = did_you_mean(str(given), literal) if literal and given is not None else ""
        return f"--{dotted}{value}: expected {_type_words(expected)}.{hint} {help_hint}"
    first = lines[0] if lines else message
    first = _PARSER_KEY.sub(lambda m: f"--{_user_key(m.group(1), command)}", first).rstrip(":")
    return f"{first}. {help_hint}"


def _user_key(key: str, command: str) -> str:
    """``fit.model.init_args.lr`` -> ``model.lr``: the key as a user writes it."""
    parts = [p for p in key.split(".") if p not in ("init_args", "dict_kwargs")]
    if parts and parts[0] == command:
        parts = parts[1:]
    return ".".join(parts)


def unknown_command(word: str, commands: Iterable[str]) -> str:
    """`tl WORD` where WORD is no command: the close ones, or the order if WORD is an option."""
    if word.startswith("-"):
        return (
            f"{word} comes after the command: tl COMMAND {word} ... (e.g. tl fit --config "
            "configs/feature_extract.yaml). `tl --help` lists the commands."
        )
    return f"Unknown command {word!r}.{did_you_mean(word, commands, prefix='tl ')} `tl --help` lists the commands."


class CommandParser(argparse.ArgumentParser):
    """argparse for tl's own commands: a mistake is one paragraph (a `TLError`, exit status 2)
    with close matches and a pointer to ``--help``, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        unrecognized = _UNRECOGNIZED.search(message)
        if unrecognized:
            flag = unrecognized.group(1).split()[0].split("=", 1)[0]
            hint = did_you_mean(flag, self._option_string_actions)
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            hint = did_you_mean(choice.group(1), re.findall(r"'?([^',\s]+)'?", choice.group(2)))
        raise TLError(f"{self.prog}: {message}.{hint} `{self.prog} --help` says more.")


#: suffixes of files tl reads or writes: an output folder named like one is a mistake
FILE_SUFFIXES = {".csv", ".json", ".html", ".png", ".jpg", ".svg", ".onnx", ".pt", ".pth", ".ckpt", ".yaml", ".yml"}
FILE_SUFFIXES |= {".txt", ".log", ".tsv", ".npz"}


def output_folder(value: str, option: str = "-o", writes: str = "its results") -> str:
    """`value` of an option that names a folder (``-o``), refused when it names a file instead
    (``-o out/predictions.csv`` would otherwise become a folder called predictions.csv)."""
    from pathlib import Path

    path = Path(value)
    if path.suffix.lower() in FILE_SUFFIXES and not path.is_dir():
        raise TLError(
            f"{option} {value} names a file, but {option} is a folder: tl writes {writes} into it. "
            f"Use {option} {path.parent if str(path.parent) != '.' else path.stem}."
        )
    return value
