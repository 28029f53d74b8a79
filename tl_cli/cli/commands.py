"""tl's own commands (``tl data ...``, ``tl weights fetch``, ``tl export``, ``tl slurm``,
``tl predict --model``): plain argparse, nothing imported before it is needed, so they start
fast. Each prints what it did; user mistakes raise `TLError`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tl_cli.cli.configs import config_command, config_type
from tl_cli.cli.mistakes import CommandParser, output_folder

TL_COMMANDS = {
    "data synth": "write the generated demo dataset (the embedded default)",
    "data split": "make train/val/test class folders from a folder of images (stratified, seeded)",
    "data check": "decode every image and report what would break or bias training",
    "export": "write an ONNX or TorchScript model + preprocessing JSON, checked against the checkpoint",
    "predict --model": "predict with an exported model (ONNX Runtime or TorchScript), no checkpoint needed",
    "slurm": "render a SLURM batch script from a config (ntasks = devices, nodes = num_nodes); submit it",
    "weights fetch": "download a backbone's pretrained weights into the cache (run on a login node)",
    "compare": "feature extraction with each of several backbones on your data: a leaderboard",
    "sweep": "a grid of runs over config keys, here or as one SLURM job array (--slurm)",
    "sweep gather": "the runs of a sweep, finished or failed, as a leaderboard",
    "resume RUN_DIR": "continue a run from its folder (config.yaml, last.ckpt), in that folder",
    "config": "the shipped configs: `tl config list`, `tl config show finetune > my.yaml`",
}


def _folder(writes: str):
    """argparse type of an ``-o`` that is a folder (`output_folder`)."""
    return lambda value: Path(output_folder(value, "-o", writes))


def _export_output(value: str) -> Path:
    if Path(value).suffix in (".onnx", ".pt"):
        return Path(value)
    return Path(output_folder(value, "-o", "the model (.onnx/.pt) and its .json (or end -o in .onnx/.pt)"))


def _data_command(argv: list[str]) -> int:
    parser = CommandParser(prog="tl data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser(
        "synth",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help=TL_COMMANDS["data synth"],
        description=(
            "Write a small generated dataset in the ImageFolder layout (OUT/{train,val,test}/<class>/), "
            "deterministic for a given seed. The class is the largest shape drawn, among smaller "
            "shapes of any class; classes differ by shape, not by colour or brightness, so a "
            "classifier has to look at the image."
        ),
    )
    synth.add_argument("out_dir", type=Path)
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes")
    synth.add_argument("--classes", type=int, default=4, help="number of classes (2-4)")
    synth.add_argument("--train", type=int, default=60, help="images per class in train/")
    synth.add_argument("--val", type=int, default=20, help="images per class in val/")
    synth.add_argument("--test", type=int, default=40, help="images per class in test/")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")
    synth.add_argument(
        "--distractors", type=int, default=3, help="small shapes of random classes in each image (0: none)"
    )
    synth.add_argument("--force", action="store_true", help="write into an existing non-empty folder")
    split = sub.add_parser(
        "split",
        help=TL_COMMANDS["data split"],
        description=(
            "Write OUT/{train,val,test}/<class>/ with N images per class per split, drawn at random "
            "(seeded) from SRC: a folder of class sub-folders, or a flat folder of files named "
            "<class>.<number>.<ext> like Kaggle's dogs-vs-cats train/ (cat.123.jpg -> cats/). "
            "Originals are hard-linked (copied where that is impossible, or with --copy), never moved."
        ),
    )
    split.add_argument("src", type=Path)
    split.add_argument("out", type=Path)
    split.add_argument("--train", type=int, required=True, help="images per class in train/")
    split.add_argument("--val", type=int, required=True, help="images per class in val/")
    split.add_argument("--test", type=int, default=0, help="images per class in test/")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    check = sub.add_parser(
        "check",
        help=TL_COMMANDS["data check"],
        description=(
            "Decode every file under ROOT/{train,val,test}/<class>/ and report per split and class: "
            "counts and imbalance; corrupt, truncated, zero-byte and non-image files; grayscale, "
            "palette, alpha, CMYK and 16-bit images (converted by tl); EXIF-rotated and very small "
            "images; identical files within and across splits. Exit status 1 when something would "
            "stop training."
        ),
    )
    check.add_argument("root", type=Path)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--min-size", type=int, default=32, help="smaller sides are reported as very small")
    check.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    check.add_argument("--strict", action="store_true", help="also fail on duplicates across splits")
    args = parser.parse_args(argv)
    if args.command == "split":
        from tl_cli.datatools.split import split_dataset

        counts = {"train": args.train, "val": args.val}
        if args.test:
            counts["test"] = args.test
        written = split_dataset(args.src, args.out, counts, seed=args.seed, copy=args.copy)
        for split_name, classes in written.items():
            print(f"tl: {args.out / split_name}: " + ", ".join(f"{c} {n}" for c, n in classes.items()))
        return 0
    if args.command == "check":
        from tl_cli.datatools.check import check_dataset, check_report_json, format_check_report

        workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
        report = check_dataset(args.root, workers=workers, min_size=args.min_size, progress=not args.json)
        print(check_report_json(report) if args.json else format_check_report(report))
        leaks = bool(report["duplicates"]["across_splits"])
        return 0 if report["ok"] and not (args.strict and leaks) else 1
    from tl_cli.datatools.synth import synthesize

    counts = synthesize(
        args.out_dir,
        seed=args.seed,
        num_classes=args.classes,
        per_split={"train": args.train, "val": args.val, "test": args.test},
        size=args.size,
        distractors=args.distractors,
        force=args.force,
    )
    total = sum(sum(c.values()) for c in counts.values())
    print(
        f"tl: wrote {total} images to {args.out_dir} ({', '.join(f'{s}: {sum(c.values())}' for s, c in counts.items())})"
    )
    return 0


def _weights_command(argv: list[str]) -> int:
    parser = CommandParser(prog="tl weights", description="Pretrained weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch",
        help=TL_COMMANDS["weights fetch"],
        description=(
            "Download the ImageNet weights of a backbone into the standard cache (HF_HOME for timm, "
            "TORCH_HOME for torchvision), so runs on compute nodes without internet find them."
        ),
    )
    fetch.add_argument("spec", help="timm:<name> or torchvision:<name>")
    args = parser.parse_args(argv)
    from tl_cli.backbones.factory import create_backbone
    from tl_cli.backbones.weights import cached_weights_path, load_weights

    backbone = create_backbone(args.spec)
    load_weights(backbone, "imagenet")
    where = cached_weights_path(args.spec)
    print(f"tl: ImageNet weights for {args.spec} are in the cache" + (f": {where}" if where else " (HF_HOME)") + ".")
    return 0


def _export_command(argv: list[str]) -> int:
    parser = CommandParser(
        prog="tl export",
        description=(
            "Write the model of a tl checkpoint as ONNX or TorchScript, with a JSON beside it that "
            "holds the preprocessing (input size, resize, crop, interpolation, mean, std) and the "
            "class names; then check the export against the checkpoint on real images (max |difference| "
            "of probabilities <= 1e-4) and say so."
        ),
    )
    parser.add_argument("--ckpt_path", required=True, type=Path)
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument(
        "-o",
        "--output",
        type=_export_output,
        default=None,
        help="where to write: a folder, or the model file itself when it ends in .onnx/.pt "
        "(default: beside the checkpoint); the .json beside the model",
    )
    parser.add_argument(
        "--images", type=Path, default=None, help="images to check the export on (default: generated ones)"
    )
    args = parser.parse_args(argv)
    from tl_cli.export import export

    path, diff = export(args.ckpt_path, args.format, args.output, args.images)
    from tl_cli.export import TOLERANCE, metadata_path

    print(f"tl: wrote {path} and {metadata_path(path)}")
    print(f"tl: checked against the checkpoint: max |difference| of probabilities {diff:.2e} (limit {TOLERANCE:.0e})")
    return 0


def predict_exported(argv: list[str]) -> int:
    parser = CommandParser(prog="tl predict --model", description="Predict with a model written by `tl export`.")
    parser.add_argument("--model", required=True, type=Path, help="an .onnx or TorchScript .pt file from `tl export`")
    parser.add_argument("--data.predict_dir", dest="predict_dir", required=True, type=Path)
    parser.add_argument("--data.batch_size", dest="batch_size", type=int, default=32)
    parser.add_argument(
        "-o",
        "--output",
        "--trainer.default_root_dir",
        dest="output",
        type=_folder("predictions.csv, in OUTPUT/version_N/"),
        default=Path("runs/predict"),
        help="results folder: predictions.csv goes to OUTPUT/version_N/ (default: runs/predict)",
    )
    args = parser.parse_args(argv)
    from tl_cli.cli.runs import claim, mark_complete
    from tl_cli.export import predict_with_exported

    name, _ = claim(args.output)
    out = args.output / name / "predictions.csv"
    n = predict_with_exported(args.model, args.predict_dir, out, args.batch_size)
    mark_complete(args.output, name)
    print(f"tl: predictions for {n} images written to {out}")
    return 0


def _slurm_command(argv: list[str]) -> int:
    parser = CommandParser(
        prog="tl slurm",
        description=(
            "Render a SLURM batch script that runs `tl fit` with the given configs: --ntasks-per-node "
            "always equals trainer.devices and --nodes trainer.num_nodes (a mismatch hangs DDP), with "
            "--signal=SIGUSR1@90 so Lightning checkpoints and requeues before the time limit. Prints "
            "it with --dry-run, submits it with sbatch otherwise. Arguments after -- go to `tl fit`."
        ),
    )
    parser.add_argument("-c", "--config", action="append", type=config_type, required=True)
    parser.add_argument("--partition", default="gpu-shared")
    parser.add_argument("--account", default=None)
    parser.add_argument("--nodes", type=int, default=None, help="= trainer.num_nodes (default: the config's, else 1)")
    parser.add_argument(
        "--gpus-per-node",
        "--devices",
        dest="devices",
        type=int,
        default=None,
        help="= trainer.devices (default: the config's, else 1)",
    )
    parser.add_argument("--cpu", action="store_true", help="CPU processes instead of GPUs (gloo DDP)")
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument(
        "--mem", default=None, help="memory a node (default: whole-node partitions all of it, shared ones a share)"
    )
    parser.add_argument("--time", default="04:00:00", help="HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--job-name", default="tl-fit")
    parser.add_argument(
        "--venv", default=None, help="environment to activate (default: the active venv or conda environment)"
    )
    parser.add_argument(
        "--cluster",
        choices=["auto", "expanse", "none"],
        default="auto",
        help="node shapes and rules to check against (auto: Expanse's on Expanse, else sinfo here; none: no check)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip parsing the tl fit arguments here")
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    import sys

    from tl_cli.cluster.partitions import Request, detect_cluster, fit_request
    from tl_cli.cluster.slurm import job_shape, render_job_script, submit

    nodes, devices = job_shape(args.config, args.nodes, args.devices, extra)
    cluster = detect_cluster() if args.cluster == "auto" else (None if args.cluster == "none" else args.cluster)
    asked = Request(
        args.partition,
        nodes,
        0 if args.cpu else devices,
        devices,
        args.cpus_per_task,
        args.mem,
        args.time,
        args.account,
    )
    job, changed = fit_request(asked, cluster, use_sinfo=args.cluster != "none")
    notes = [] if args.no_check else _check_fit(args.config, extra)
    for note in [*changed, *notes]:
        print(f"tl slurm: {note}", file=sys.stderr)
    script = render_job_script(
        args.config,
        partition=job.partition,
        account=job.account,
        nodes=nodes,
        devices=devices,
        cpu=args.cpu,
        cpus_per_task=job.cpus_per_task,
        mem=job.mem or "0",
        time_limit=job.time,
        job_name=args.job_name,
        venv=args.venv,
        extra=extra,
    )
    if args.dry_run:
        print(script, end="")
    else:
        print(f"tl: {submit(script, args.job_name)}")
    return 0


def _check_fit(configs: list[Path], extra: list[str]) -> list[str]:
    from tl_cli.cli.jobcheck import check_fit

    return check_fit(configs, extra)


def _compare_command(argv: list[str]) -> int:
    from tl_cli.cli.compare import PRESETS

    parser = CommandParser(
        prog="tl compare",
        description=(
            "Run feature extraction (cached features: one pass of each backbone over the images) with "
            "each backbone on the config's data, then test and time it; write leaderboard.csv, "
            "leaderboard.png (accuracy against speed) and print the table, best validation accuracy "
            "first. Arguments after -- go to every `tl fit` (e.g. -- --data.root DIR)."
        ),
    )
    parser.add_argument("-c", "--config", action="append", type=config_type, required=True)
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=[],
        metavar="SPEC[=WEIGHTS]",
        help="e.g. timm:resnet18 torchvision:resnet50=/path/w.pth",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"a named list: {'; '.join(f'{k}: {len(v)} backbones' for k, v in PRESETS.items())}",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=_folder("leaderboard.csv, leaderboard.png and one run folder per backbone"),
        default=Path("runs/compare"),
        help="results folder: leaderboard.csv, leaderboard.png, a run folder per backbone (default runs/compare)",
    )
    _add_array_options(parser)
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    from tl_cli.cli.compare import compare, parse_backbones, write_outputs

    if args.slurm:  # one array task per backbone; `tl sweep gather DIR` is the leaderboard
        from tl_cli.cli.sweep import make_plan

        runs = [
            {"model.backbone": spec, **({"model.weights": weights} if weights else {})}
            for spec, weights in parse_backbones(args.backbones, args.preset)
        ]
        extra = [*extra, "--model", "FeatureExtraction"]
        return _submit_array(make_plan(args.config, runs, args.output, extra, args.runs_per_task), args)

    entries = compare(args.config, parse_backbones(args.backbones, args.preset), args.output, extra)
    print("\n" + write_outputs(entries, args.output))
    ok = [e for e in entries if e.status == "ok"]
    print(f"\ntl: leaderboard.csv and leaderboard.png in {args.output}")
    if ok:
        print(
            f"tl: next: tl fit --config configs/finetune.yaml --model.backbone {ok[0].backbone} --model.init_from {ok[0].checkpoint}"
        )
    return 0 if ok else 1


def _add_array_options(parser: argparse.ArgumentParser) -> None:
    """--slurm and the job array's options (tl sweep, tl compare)."""
    slurm = parser.add_argument_group("SLURM (with --slurm)")
    slurm.add_argument("--slurm", action="store_true", help="submit one job array instead of running here")
    slurm.add_argument("--dry-run", action="store_true", help="print the array script instead of submitting it")
    slurm.add_argument("--max-concurrent", type=int, default=None, help="array tasks running at once (%%N)")
    slurm.add_argument("--runs-per-task", type=int, default=1, help="runs side by side in one task (one GPU)")
    slurm.add_argument("--partition", default="gpu-shared")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--cpu", action="store_true", help="CPU tasks instead of one GPU each")
    slurm.add_argument("--cpus-per-task", type=int, default=10)
    slurm.add_argument("--mem", default="92G")
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--job-name", default="tl-sweep")
    slurm.add_argument("--venv", default=os.environ.get("VIRTUAL_ENV", ".venv"))


def _submit_array(plan: dict, args: argparse.Namespace) -> int:
    """Render the plan's job array; print it (--dry-run) or submit it."""
    from tl_cli.cli.sweep import render_array_script
    from tl_cli.cluster.slurm import submit

    script = render_array_script(
        plan,
        runs_per_task=args.runs_per_task,
        max_concurrent=args.max_concurrent,
        cpu=args.cpu,
        cpus_per_task=args.cpus_per_task,
        job_name=args.job_name,
        account=args.account,
        partition=args.partition,
        mem=args.mem,
        time_limit=args.time,
        venv=args.venv,
    )
    folder = Path(plan["folder"])
    (folder / "sweep.sbatch").write_text(script)
    if args.dry_run:
        print(script, end="")
        return 0
    print(f"tl: {submit(script, args.job_name)}")
    print(f"tl: watch with `squeue --me`; then: tl sweep gather {folder}")
    return 0


def _sweep_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="tl sweep",
        usage="tl sweep -c CONFIG --grid KEY=V1,V2 [--grid ...] [-o DIR] [--slurm ...] [-- FIT ARGS]\n"
        "       tl sweep gather DIR",
        description=(
            "Run `tl fit` for every combination of the --grid values, each in DIR/point_<i>/ "
            "(its own run folder, checkpoints and logs/point_<i>.log). Here: one after the other. "
            "With --slurm: one job array (array_<job>_<task>/ run folders), at most --max-concurrent "
            "tasks at once, --runs-per-task small runs side by side on one GPU. Then `tl sweep gather "
            "DIR` writes DIR/leaderboard.csv and leaderboard.png and prints the table, best validation "
            "accuracy first, failed runs with their error. Arguments after -- go to every `tl fit`."
        ),
    )
    parser.add_argument("-c", "--config", action="append", type=config_type, required=True)
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a config key and its values, e.g. model.lr=1e-3,1e-4 or 'unfreeze.schedule={0: 2},{0: 4}'",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=_folder("point_<i>/ run folders and logs/"),
        default=None,
        help="sweep folder: point_<i>/ run folders, logs/, sweep.json; `tl sweep gather` adds leaderboard.csv "
        "(default runs/sweep_<config>)",
    )
    _add_array_options(parser)
    return parser


def _gather_command(argv: list[str]) -> int:
    parser = CommandParser(
        prog="tl sweep gather",
        description="Write DIR/leaderboard.csv and leaderboard.png from the runs of the sweep in DIR "
        "(finished, requeued, failed with their error, not started) and print the table.",
    )
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    from tl_cli.cli.compare import write_outputs
    from tl_cli.cli.sweep import gather

    entries = gather(args.folder)
    print(write_outputs(entries, args.folder))
    print(f"\ntl: leaderboard.csv and leaderboard.png in {args.folder}")
    return 0 if any(e.status == "ok" for e in entries) else 1


def _sweep_command(argv: list[str]) -> int:
    if argv[:1] == ["gather"]:
        return _gather_command(argv[1:])
    args, extra = _sweep_parser().parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    from tl_cli.cli.sweep import make_plan, parse_grid, points, run_here

    grid = parse_grid(args.grid)
    folder = args.output or Path("runs") / f"sweep_{args.config[-1].stem}"
    plan = make_plan(args.config, points(grid), folder, extra, runs_per_task=args.runs_per_task)
    if not args.dry_run:
        print(f"tl sweep: {len(plan['points'])} runs in {folder}")
    if not args.slurm:
        failed = run_here(plan)
        print(f"tl sweep: done ({failed} failed); the leaderboard: tl sweep gather {folder}")
        return 0 if failed < len(plan["points"]) else 1
    return _submit_array(plan, args)


COMMANDS = {
    "config": config_command,
    "sweep": _sweep_command,
    "data": _data_command,
    "export": _export_command,
    "slurm": _slurm_command,
    "weights": _weights_command,
    "compare": _compare_command,
}
