"""The image-folder DataModule: ``root/{train,val,test}/<class>/<image>``.

It knows no network. Two things come from the model it is trained with, through the
`ClassifierProtocol` methods, when the Trainer sets it up: the class order (a checkpoint fixes
it; a new run takes the folder names of ``train/``) and the preprocessing (from the backbone,
with ``image_size`` overridden here; a checkpoint fixes it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional, Protocol, Union

import lightning.pytorch as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from tl_cli.cache import (
    CachedImages,
    FeatureDataset,
    FeatureStore,
    ImageStore,
    cache_root,
    files_fingerprint,
    make_key,
)
from tl_cli.errors import TLError
from tl_cli.transforms import (
    AUGMENTS,
    cache_side,
    decode_for_cache,
    eval_transform,
    is_deterministic,
    load_rgb,
    tensor_eval_transform,
    tensor_train_transform,
    train_transform,
)

CacheMode = Union[bool, Literal["auto"]]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
# Files that operating systems drop into folders; they are not the user's images.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini"})
SPLITS = ("train", "val", "test")


class ClassifierProtocol(Protocol):
    def adopt_classes(self, found: list[str], stage: str) -> list[str]: ...

    def resolve_preprocessing(self, image_size: Optional[int], stage: str) -> dict[str, Any]: ...

    @property
    def frozen_for_whole_run(self) -> bool: ...

    def feature_identity(self) -> dict[str, Any]: ...

    def extract_features(self, loader: DataLoader) -> torch.Tensor: ...


def _is_ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name in IGNORED_NAMES


def list_images(folder: Path, others_too: bool = False) -> list[Path]:
    """Image files under `folder`, recursively, sorted; other files are an error, not skipped.

    With `others_too` (prediction), every file is returned: the ones that are not images become
    error rows in predictions.csv rather than stopping the run.
    """
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_ignored(path):
                continue
            (images if others_too or path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    if others:
        shown = "\n  ".join(str(p) for p in others[:10])
        more = f"\n  ... and {len(others) - 10} more" if len(others) > 10 else ""
        raise TLError(
            f"{len(others)} file(s) under {folder} are not images (by extension; tl reads "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}):\n  {shown}{more}\n"
            "Move them out of the image folders (tl never skips a file silently)."
        )
    return images


def scan_split(split_dir: Path) -> dict[str, list[Path]]:
    """``{class name: [image paths]}`` for one split folder, classes sorted by name."""
    if not split_dir.is_dir():
        raise TLError(
            f"Split folder {split_dir} does not exist. data.root must hold train/ and val/ "
            "(and test/ for `tl test`), each with one sub-folder per class; see data/README.md."
        )
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not _is_ignored(p))
    loose = [p for p in split_dir.iterdir() if p.is_file() and not _is_ignored(p)]
    if loose:
        raise TLError(
            f"{split_dir} holds files directly ({loose[0].name}, ...); images must sit in one "
            f"sub-folder per class, e.g. {split_dir}/cats/{loose[0].name}."
        )
    if not class_dirs:
        raise TLError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class>/.")
    classes = {d.name: list_images(d) for d in class_dirs}
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise TLError(
            f"Class folder(s) {', '.join(str(split_dir / e) for e in empty)} contain no images. "
            "Add images or remove the folder."
        )
    return classes


def check_same_classes(reference: list[str], found: list[str], where: Path, reference_name: str) -> None:
    missing = sorted(set(reference) - set(found))
    extra = sorted(set(found) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing class folder(s) {', '.join(missing)}")
        if extra:
            parts.append(f"class folder(s) {', '.join(extra)} not in {reference_name}")
        raise TLError(
            f"{where} does not have the classes of {reference_name} ({', '.join(reference)}): "
            f"{'; '.join(parts)}. Every split needs the same class folders."
        )


def decode_error(path: Path, exc: Exception) -> TLError:
    return TLError(
        f"Cannot decode image {path}: {type(exc).__name__}: {exc}. Remove or replace the file "
        "(`tl data check ROOT` lists every such file)."
    )


UNREADABLE = -2  # label of a `tolerant` dataset's item whose file could not be decoded


class ImageFiles(Dataset):
    """Images with integer labels; items are ``(tensor, label, index)`` (label -1: unknown).

    A `tolerant` dataset (prediction) answers an undecodable file with a blank image and
    label `UNREADABLE` instead of raising, so one bad file does not stop the others.
    """

    def __init__(self, samples: list[tuple[Path, int]], transform: Any, tolerant: bool = False) -> None:
        self.samples = samples
        self.transform = transform
        self.tolerant = tolerant

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except Exception as exc:
            if self.tolerant:
                blank = self.transform(Image.new("RGB", (64, 64)))
                return torch.zeros_like(blank), UNREADABLE, index
            raise decode_error(path, exc) from None
        return self.transform(image), label, index

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]


def _as_is(item: Any) -> Any:
    return item


class ResumableRandomSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way into it.

    Epoch e's order is a function of (seed, e) alone, so a run resumed from a mid-epoch
    checkpoint (a preempted SLURM job) can skip exactly the samples the interrupted run had
    already trained on and see the rest in the same order.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, count: int) -> None:
        """Start the next iteration after `count` samples (once)."""
        self._skip = count

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        start, self._skip = self._skip, 0
        return iter(order[start:])


class _DecodeForCache(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], preprocessing: dict[str, Any]) -> None:
        self.samples, self.preprocessing = samples, preprocessing

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        path = self.samples[index][0]
        try:
            return decode_for_cache(path, self.preprocessing)
        except Exception as exc:
            raise decode_error(path, exc) from None


class ImageFolderData(pl.LightningDataModule):
    """Labelled images in ``root/{train,val,test}/<class>/`` and unlabelled ones in `predict_dir`.

    Args:
        root: folder holding ``train/`` and ``val/`` (and ``test/`` for `tl test`), each with one
            sub-folder per class (``data/catsVsDogs/train/cats/cat.1.jpg``). See data/README.md.
        batch_size: images per batch (per device).
        num_workers: DataLoader worker processes; null picks min(8, available CPU cores).
        augment: train-time augmentation: ``none`` (deterministic), ``flip`` (horizontal flip),
            ``standard`` (random resized crop + flip), ``randaugment`` (standard + RandAugment).
        image_size: input size in pixels (square); null uses the backbone's pretrained size.
        predict_dir: folder of images (searched recursively) for `tl predict`.
        cache_features: reuse the frozen backbone's output ("bottleneck features") across
            epochs and runs. ``auto``: when the backbone stays frozen for the whole run and
            ``augment`` is ``none``; ``true``: always (an error if that cannot be right);
            ``false``: recompute every epoch.
        cache_images: keep train/val images decoded and resized once, as uint8 (in memory if
            they take at most 1/4 of the available memory, else memory-mapped from the cache
            file), and augment tensors. ``auto`` and ``true``: on whenever features are not
            cached; ``false``: decode every file every epoch.
        cache_dir: where caches live; null: ``$TL_CACHE_DIR`` or ``~/.cache/tl``.
        on_bad_image: what to do with files that cannot be decoded (every image is decoded
            once before the first epoch; the result is remembered until the files change):
            ``error`` stops with the list of bad files; ``skip`` leaves them out and warns
            with each one's name.
    """

    def __init__(
        self,
        root: str = "data/catsVsDogs",
        batch_size: int = 32,
        num_workers: Optional[int] = None,
        augment: str = "none",
        image_size: Optional[int] = None,
        predict_dir: Optional[str] = None,
        cache_features: CacheMode = "auto",
        cache_images: CacheMode = "auto",
        cache_dir: Optional[str] = None,
        on_bad_image: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__()
        if augment not in AUGMENTS:
            raise TLError(f"data.augment={augment!r} is not one of {', '.join(AUGMENTS)}.")
        if batch_size < 1:
            raise TLError(f"data.batch_size={batch_size} must be at least 1.")
        if image_size is not None and image_size < 16:
            raise TLError(f"data.image_size={image_size} is too small; use at least 16 pixels or null.")
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.image_size = image_size
        self.predict_dir = Path(predict_dir) if predict_dir else None
        for name, value in (("cache_features", cache_features), ("cache_images", cache_images)):
            if value not in (True, False, "auto"):
                raise TLError(f"data.{name}={value!r}; use auto, true or false.")
        self.cache_features = cache_features
        self.cache_images = cache_images
        self.cache_dir = cache_dir
        if on_bad_image not in ("error", "skip"):
            raise TLError(f"data.on_bad_image={on_bad_image!r}; use error or skip.")
        self.on_bad_image = on_bad_image
        self._served: dict[str, Any] = {}
        self.class_names: Optional[list[str]] = None
        self.preprocessing: Optional[dict[str, Any]] = None
        self.datasets: dict[str, ImageFiles] = {}

    # -- discovery ------------------------------------------------------------------------

    def _model(self) -> Optional[ClassifierProtocol]:
        trainer = getattr(self, "trainer", None)
        return trainer.lightning_module if trainer is not None else None

    def _scan(self, split: str) -> dict[str, list[Path]]:
        if split not in self._scans:
            self._scans[split] = scan_split(self.root / split)
        return self._scans[split]

    def _labelled(self, split: str, classes: list[str]) -> list[tuple[Path, int]]:
        found = self._scan(split)
        check_same_classes(classes, sorted(found), self.root / split, "the model" if split != "train" else "train/")
        index = {name: i for i, name in enumerate(classes)}
        return self._screen(self.root / split, [(path, index[name]) for name in sorted(found) for path in found[name]])

    def _screen(self, where: Path, samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """Decode every file once (remembered per file set) and apply `on_bad_image`."""
        from tl_cli.checks import inspect_all

        path = cache_root(self.cache_dir) / "checks" / f"{make_key('check', files=files_fingerprint(samples))}.json"

        def load() -> Optional[list[dict[str, str]]]:
            try:
                return json.loads(path.read_text())["bad"]
            except (OSError, ValueError, KeyError):
                return None

        def build() -> None:
            infos = inspect_all([p for p, _ in samples], self._workers())
            bad = [{"path": i["path"], "problem": i["error"]} for i in infos if i["error"]]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"bad": bad}))
            os.replace(tmp, path)

        bad = self._rank_zero_then_all(load, build)
        if not bad:
            return samples
        listing = "\n  ".join(f"{b['path']}: {b['problem']}" for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        if self.on_bad_image == "error":
            raise TLError(
                f"{len(bad)} file(s) in {where} cannot be used:\n  {listing}{more}\n"
                "Remove or replace them, or pass --data.on_bad_image skip to train without them "
                f"(`tl data check {self.root}` reports every problem)."
            )
        for b in bad:
            self._say(f"warning: skipping {b['path']}: {b['problem']} (data.on_bad_image=skip)", err=True)
        dropped = {b["path"] for b in bad}
        return [(p, label) for p, label in samples if str(p) not in dropped]

    def setup(self, stage: str) -> None:
        if not self.root.is_dir() and stage != "predict":
            raise TLError(
                f"data.root={str(self.root)!r} does not exist. Point --data.root at a folder with "
                "train/ and val/ (and test/) class folders, or make one with "
                "`tl data synth DIR` / `tl data split SRC DIR`."
            )
        self._scans: dict[str, dict[str, list[Path]]] = {}
        model = self._model()
        known = getattr(model, "class_names", None)
        found: list[str] = []
        if stage == "fit":
            found = sorted(self._scan("train"))
        elif not known and stage != "predict":
            split = "train" if (self.root / "train").is_dir() else ("test" if stage == "test" else "val")
            found = sorted(self._scan(split))
        classes = model.adopt_classes(found, stage) if model is not None else found
        if not classes:
            raise TLError("No class names: the checkpoint holds none and data.root has no train/ folder.")
        self.class_names = list(classes)
        if model is not None:
            self.preprocessing = model.resolve_preprocessing(self.image_size, stage)
        if self.preprocessing is None:
            raise TLError("ImageFolderData needs preprocessing settings from a model before setup.")

        self._served = {}
        if stage == "fit":
            self.use_feature_cache()  # a cache_features=true that cannot work stops here
            self.datasets["train"] = ImageFiles(
                self._labelled("train", self.class_names), train_transform(self.augment, self.preprocessing)
            )
            self.datasets["val"] = ImageFiles(
                self._labelled("val", self.class_names), eval_transform(self.preprocessing)
            )
        elif stage == "validate":
            self.datasets["val"] = ImageFiles(
                self._labelled("val", self.class_names), eval_transform(self.preprocessing)
            )
        elif stage == "test":
            self.datasets["test"] = ImageFiles(
                self._labelled("test", self.class_names), eval_transform(self.preprocessing)
            )
        elif stage == "predict":
            if self.predict_dir is None:
                raise TLError("`tl predict` needs --data.predict_dir DIR, a folder of images to classify.")
            if not self.predict_dir.is_dir():
                raise TLError(f"data.predict_dir={str(self.predict_dir)!r} is not a folder.")
            paths = list_images(self.predict_dir, others_too=True)
            if not paths:
                raise TLError(f"data.predict_dir={str(self.predict_dir)!r} holds no images.")
            self.datasets["predict"] = ImageFiles(
                [(p, -1) for p in paths], eval_transform(self.preprocessing), tolerant=True
            )

    # -- loaders --------------------------------------------------------------------------

    def _workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        return min(8, cores)

    def _loader(self, dataset: Dataset, split: str, shuffle: bool = False, workers: Optional[int] = None) -> DataLoader:
        workers = self._workers() if workers is None else workers
        # Shuffling with a sampler and a generator of our own: the order and the workers' seeds
        # depend on (seed, epoch) only, never on the global RNG, so a resumed run matches.
        seed = torch.initial_seed() % 2**31
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=ResumableRandomSampler(len(dataset), seed) if shuffle else None,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0 and split in ("train", "val"),
        )

    def _served_loader(self, split: str, shuffle: bool = False) -> DataLoader:
        dataset = self.served(split)
        # features are tensors in memory already: worker processes would only add latency
        workers = 0 if isinstance(dataset, FeatureDataset) else None
        return self._loader(dataset, split, shuffle=shuffle, workers=workers)

    def train_dataloader(self) -> DataLoader:
        return self._served_loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._served_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], "test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["predict"], "predict")

    # -- caches ---------------------------------------------------------------------------

    def use_feature_cache(self) -> bool:
        """Whether train/val are served as cached bottleneck features (see `cache_features`)."""
        model = self._model()
        if self.cache_features is False or model is None:
            return False
        frozen = model.frozen_for_whole_run
        deterministic = is_deterministic(self.augment)
        if self.cache_features is True and not deterministic:
            raise TLError(
                f"data.cache_features=true, but data.augment={self.augment} changes every training "
                "image every epoch, so the backbone's output cannot be computed once and reused. "
                "Use data.augment=none to cache features, or data.cache_features=auto/false."
            )
        if self.cache_features is True and not frozen:
            raise TLError(
                "data.cache_features=true, but model.unfreeze trains backbone stages, so its output "
                "changes every step. Cached features are for feature extraction (model.unfreeze "
                "null); use data.cache_features=auto/false here."
            )
        return frozen and deterministic

    def served(self, split: str) -> Dataset:
        """The dataset a train/val loader iterates: cached features, cached images, or files."""
        if split not in self._served:
            if self.use_feature_cache():
                self._served[split] = self._feature_dataset(split)
            elif self.cache_images is not False:
                self._served[split] = self._image_dataset(split)
            else:
                self._served[split] = self.datasets[split]
        return self._served[split]

    def _rank_zero_then_all(self, load: Any, build: Any) -> Any:
        """Rank 0 loads or builds the entry while the other ranks wait, then they load it.

        Building leaves the random number generators as they were, so a run with a cache
        shuffles and drops out exactly like the same run without it.
        """
        trainer = getattr(self, "trainer", None)
        value = None
        if trainer is None or trainer.is_global_zero:
            value = load()
            if value is None:
                with torch.random.fork_rng(devices=[]):
                    build()
                value = load()
        if trainer is not None:
            trainer.strategy.barrier("tl-cache")
        if value is None:
            value = load()
        if value is None:
            raise RuntimeError("cache entry missing after rank 0 built it")
        return value

    def _say(self, text: str, err: bool = False) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.is_global_zero:
            print(f"tl: {text}", flush=True, file=sys.stderr if err else sys.stdout)

    def _feature_dataset(self, split: str) -> FeatureDataset:
        model = self._model()
        images = self.datasets[split]
        n, dim = len(images), None
        key = make_key(
            "features",
            split=split,
            files=files_fingerprint(images.samples),
            preprocessing=self.preprocessing,
            model=model.feature_identity(),
        )
        store = FeatureStore(cache_root(self.cache_dir), key)
        built: dict[str, float] = {}

        def build() -> None:
            start = time.perf_counter()
            # the eval transform, no shuffling: features line up with samples
            extraction = ImageFiles(images.samples, eval_transform(self.preprocessing))
            store.save(model.extract_features(self._loader(extraction, "extract")))
            built["seconds"] = time.perf_counter() - start

        dim = model.spec.num_features
        features = self._rank_zero_then_all(lambda: store.load(n, dim), build)
        how = f"computed in {built['seconds']:.1f} s" if built else "loaded"
        self._say(f"{split}: bottleneck features of {n} images {how} ({store.path})")
        return FeatureDataset(features, [label for _, label in images.samples])

    def _image_dataset(self, split: str) -> CachedImages:
        images = self.datasets[split]
        n = len(images)
        prep = self.preprocessing
        key = make_key(
            "images",
            files=files_fingerprint(images.samples),
            side=cache_side(prep),
            interpolation=prep["interpolation"],
        )
        store = ImageStore(cache_root(self.cache_dir), key)
        built: dict[str, float] = {}

        def build() -> None:
            start = time.perf_counter()
            decoder = _DecodeForCache(images.samples, prep)
            workers = self._workers()
            loader = DataLoader(
                decoder, batch_size=None, num_workers=workers, prefetch_factor=8 if workers else None, collate_fn=_as_is
            )
            store.build(lambda: iter(loader), n)
            built["seconds"] = time.perf_counter() - start

        data, offsets, shapes = self._rank_zero_then_all(lambda: store.load(n), build)
        kind = "in memory" if not hasattr(data, "filename") else "memory-mapped"
        how = f"decoded in {built['seconds']:.1f} s" if built else "loaded decoded"
        self._say(f"{split}: {n} images {how}, {data.nbytes / 2**20:.0f} MiB {kind} ({store.data_path})")
        training = split.endswith("train")
        transform = tensor_train_transform(self.augment, prep) if training else tensor_eval_transform(prep)
        return CachedImages(data, offsets, shapes, [label for _, label in images.samples], transform)

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class (in class order) in a split that has been set up."""
        counts = [0] * len(self.class_names or [])
        for _, label in self.datasets[split].samples:
            counts[label] += 1
        return counts

    def paths(self, split: str) -> list[Path]:
        return self.datasets[split].paths
