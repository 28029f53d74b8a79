"""`tl data check`: every image of ``root/{train,val,test}/<class>/`` decoded and reported.

Every file is decoded fully (a truncated JPEG only fails at its last bytes) and converted the
way training converts it. What would break training is an *error*; what tl converts on the fly
(grayscale, palette, alpha, CMYK, 16-bit) or what deserves a look (EXIF rotation, very small
images, duplicates) is reported but does not stop anything.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from tl_cli.data.folders import IMAGE_SUFFIXES, is_ignored
from tl_cli.data.screening import inspect_all
from tl_cli.errors import TLError

SPLITS = ("train", "val", "test")  # the splits `tl data check` reports on


def _split_files(root: Path, split: str) -> dict[str, list[Path]]:
    classes: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir() and not is_ignored(p)):
        classes[class_dir.name] = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and not any(is_ignored(Path(part)) for part in p.relative_to(class_dir).parts)
        )
    return classes


def check_dataset(root: str | Path, workers: int = 2, min_size: int = 32, progress: bool = False) -> dict[str, Any]:
    """Inspect every file under ``root/{train,val,test}/<class>/``; return the report as a dict."""
    root = Path(root)
    if not root.is_dir():
        raise TLError(f"{root} is not a folder. Pass the data root that holds train/, val/ and test/.")
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        raise TLError(f"{root} has none of train/, val/, test/. See data/README.md for the layout.")
    files = {s: _split_files(root, s) for s in splits}
    order = [(s, c, p) for s in splits for c, ps in files[s].items() for p in ps]
    infos = list(inspect_all([p for _, _, p in order], workers, IMAGE_SUFFIXES, progress))

    report: dict[str, Any] = {
        "root": str(root),
        "splits": {},
        "imbalance": {},
        "errors": [],
        "converted": defaultdict(list),
        "exif_rotated": [],
        "small": [],
        "duplicates": {"within_split": [], "across_splits": []},
    }
    usable: dict[str, dict[str, int]] = {s: {c: 0 for c in files[s]} for s in splits}
    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for (split, cls, _), info in zip(order, infos, strict=True):
        if info["error"]:
            report["errors"].append({"path": info["path"], "problem": info["error"]})
            continue
        usable[split][cls] += 1
        for kind in info["converted"]:
            report["converted"][kind].append(info["path"])
        if info["exif_rotated"]:
            report["exif_rotated"].append(info["path"])
        if min(info["width"], info["height"]) < min_size:
            report["small"].append(f"{info['path']} ({info['width']}x{info['height']})")
        by_hash[info["sha256"]].append((split, info["path"]))
    for split in splits:
        report["splits"][split] = usable[split]
        counts = [n for n in usable[split].values() if n]
        report["imbalance"][split] = round(max(counts) / min(counts), 2) if counts else None
        for cls, n in usable[split].items():
            if n == 0:
                report["errors"].append(
                    {"path": str(root / split / cls), "problem": "class folder has no usable image"}
                )
        if not files[split]:
            needs = (
                "tl test needs them; tl fit only checks test/ for copies" if split == "test" else "tl fit needs them"
            )
            report["errors"].append(
                {
                    "path": str(root / split),
                    "problem": f"no class folders ({needs}); put each class's images in <class>/",
                }
            )
        for loose in sorted(p for p in (root / split).iterdir() if p.is_file() and not is_ignored(p)):
            # tl fit (train/, val/) and tl test (test/) stop on these: images belong in a class folder
            report["errors"].append(
                {"path": str(loose), "problem": "a file directly in the split folder; move it into a class folder"}
            )
    reference = sorted(files["train"]) if "train" in files else None
    for split in splits:
        if reference is not None and files[split] and sorted(files[split]) != reference:
            missing = sorted(set(reference) - set(files[split]))
            extra = sorted(set(files[split]) - set(reference))
            problem = "; ".join(
                ([f"missing class folder(s) {', '.join(missing)}"] if missing else [])
                + ([f"class folder(s) {', '.join(extra)} not in train/"] if extra else [])
            )
            report["errors"].append({"path": str(root / split), "problem": problem})
    for group in by_hash.values():
        if len(group) > 1:
            key = "across_splits" if len({s for s, _ in group}) > 1 else "within_split"
            report["duplicates"][key].append(sorted(p for _, p in group))
    report["converted"] = dict(report["converted"])
    report["n_files"] = len(order)
    report["ok"] = not report["errors"]
    return report


def format_check_report(report: dict[str, Any], limit: int = 20) -> str:
    lines = [f"tl data check {report['root']}: {report['n_files']} files"]
    for split, classes in report["splits"].items():
        total = sum(classes.values())
        ratio = report["imbalance"][split]
        lines.append(
            f"\n{split}/: {total} usable images, {len(classes)} classes" + (f", imbalance {ratio}:1" if ratio else "")
        )
        for cls, n in classes.items():
            lines.append(f"  {cls:<24} {n:>7}  {100 * n / max(total, 1):5.1f} %")

    def section(title: str, items: list[str]) -> None:
        if items:
            lines.append(f"\n{title} ({len(items)}):")
            lines.extend(f"  {item}" for item in items[:limit])
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more (--json lists all)")

    section("ERRORS: would stop training", [f"{e['path']}: {e['problem']}" for e in report["errors"]])
    leaks = report["duplicates"]["across_splits"]
    section(
        "Identical files in more than one split (leaks evaluation data into training)", [" = ".join(g) for g in leaks]
    )
    section("Identical files within a split", [" = ".join(g) for g in report["duplicates"]["within_split"]])
    for kind, paths in sorted(report["converted"].items()):
        section(f"{kind} images (tl converts them to RGB)", paths)
    section("EXIF-rotated images (tl applies the rotation)", report["exif_rotated"])
    section("Very small images", report["small"])
    if report["ok"]:
        lines.append(
            "\nNo errors: training can use every file."
            if not leaks
            else "\nNo errors, but see the leaks above: remove the copies from val/ and test/ (or the originals "
            "from train/), or validation and test scores overstate accuracy."
        )
    else:
        lines.append(
            "\nFix: remove or replace the files listed under ERRORS (or train with "
            "--data.on_bad_image skip to leave them out), and give every split the same class folders."
        )
    return "\n".join(lines)


def check_report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
