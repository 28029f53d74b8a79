"""The image-folder DataModule: ``root/{train,val,test}/<class>/<image>``.

It knows no model. What passes between it and the model that trains on it is small and
public (the model's side is in `tl_cli.models.Classifier.setup`):

- ``class_names``: after ``setup``, the class folders of ``train/`` (of the evaluated split
  for ``validate``/``test``), sorted. A model that already has a class order (a checkpoint)
  sets it to that order before any loader is built; every split must hold those classes.
- ``image_size``: read by the model to size its preprocessing.
- ``preprocessing``: input size, mean, std, interpolation, crop; set by the model before any
  loader is built (it belongs to the backbone and is stored in checkpoints).
- ``class_counts(split)``: images per class, for class weights; with ``on_bad_image skip``
  it runs the split's first pass (after ``configure_model``) so skipped files do not count.
- ``offer_features(extractor)``: called by the freezing callback when the backbone stays
  frozen for the whole run; then train/val may be served as cached bottleneck features.
"""

from __future__ import annotations

import collections
import math
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from tl_cli.cluster import distributed
from tl_cli.data.cache import cache_root, image_ram_budget
from tl_cli.data.datasets import (
    CachedImages,
    FeatureDataset,
    ImageFiles,
    ResumableSampler,
    worker_options,
)
from tl_cli.data.first_pass import Extractor, screen_and_cache
from tl_cli.data.folders import class_folders, labelled_samples, named_as, predict_images, target_train_images
from tl_cli.data.leaks import warn_about_leaks
from tl_cli.data.stage import stage_data
from tl_cli.data.transforms import Augment, crop_pipeline, is_deterministic
from tl_cli.errors import TLError, warn_deprecated

CacheMode = Union[bool, Literal["auto"]]


def _check_sizes(batch_size: int, min_steps_per_epoch: Optional[int], image_size: Optional[int]) -> None:
    if batch_size < 1:
        raise TLError(f"data.batch_size={batch_size} must be at least 1.")
    if min_steps_per_epoch is not None and min_steps_per_epoch < 1:
        raise TLError(
            f"data.min_steps_per_epoch={min_steps_per_epoch} must be at least 1, or null (one pass an epoch)."
        )
    if image_size is not None and image_size < 16:
        raise TLError(f"data.image_size={image_size} is too small; use at least 16 pixels or null.")


def passes_for(min_steps: Optional[int], n: int, world: int, batch_size: int) -> int:
    """Passes over `n` training samples an epoch for at least `min_steps` batches a rank.

    An epoch's passes are one stream, batched across pass boundaries (`ResumableSampler`), so
    the count is the fewest passes p with ceil(p * per_rank / batch_size) >= min_steps.
    """
    if min_steps is None or n == 0:
        return 1
    per_rank = math.ceil(n / world)
    return max(1, (min_steps - 1) * batch_size // per_rank + 1)


def validation_sampler(dataset: Dataset) -> Optional[UnrepeatedDistributedSampler]:
    """Each validation image on one rank, once; None (Lightning's choice) in one process.

    Lightning would give validation a padded DistributedSampler: with N images over W ranks,
    up to W - 1 of them counted twice in val/loss, val/acc and what best.ckpt and early stopping
    compare. The shares here may differ by one image: validation sums are reduced once, at
    epoch end, so uneven shares are safe; with N < W a rank would get none, so Lightning's
    padding stays. Test and predict are gathered and de-duplicated by index (reporting.py).
    """
    world = distributed.world_size()
    if world == 1 or len(dataset) < world:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=distributed.rank(), shuffle=False)


def features_wanted(cache_features: CacheMode, extractor: Optional[Extractor], augment: str) -> bool:
    """Whether a split is served as cached bottleneck features (``data.cache_features``)."""
    if cache_features is True:
        if extractor is None:
            raise TLError(
                "data.cache_features=true, but the backbone is not frozen for the whole run (the "
                "unfreeze schedule trains stages, or no FreezeBackbone callback) or the model "
                "mixes images (model.mixup_alpha, model.cutmix_alpha), so its output changes "
                "every step. Use data.cache_features auto or false here."
            )
        if not is_deterministic(augment):
            raise TLError(
                f"data.cache_features=true, but data.augment={augment} changes every training "
                "image every epoch, so the backbone's output cannot be computed once and reused. "
                "Use data.augment none to cache features, or data.cache_features auto/false."
            )
    return cache_features is not False and extractor is not None and is_deterministic(augment)


def default_workers(num_workers: Optional[int]) -> int:
    """``data.num_workers``, or min(8, the CPU cores this process may use)."""
    if num_workers is not None:
        return num_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(8, cores)


def say(text: str) -> None:
    """Print a ``tl:`` line once (rank 0); warnings to stderr."""
    if distributed.rank() == 0:
        print(f"tl: {text}", flush=True, file=sys.stderr if text.startswith("warning") else sys.stdout)


class ImageFolderData(pl.LightningDataModule):
    """Labelled images in ``root/{train,val,test}/<class>/`` and unlabelled ones in `predict_dir`.

    Args:
        root: folder holding ``train/`` and ``val/`` (and ``test/`` for `tl test`), each with one
            sub-folder per class (``data/catsVsDogs/train/cats/cat.1.jpg``). See data/README.md.
        batch_size: images per batch (per device; domain adaptation: per domain).
        min_steps_per_epoch: at least this many training batches an epoch (per device): a
            small training set is passed over several times an epoch, each pass in a fresh
            order with fresh augmentations (TLlib's ``iters_per_epoch``); null: one pass an
            epoch. Epoch-counted settings (warmup, schedules, patience) count these epochs.
        num_workers: DataLoader worker processes; null picks min(8, available CPU cores).
        augment: train-time augmentation: ``none`` (deterministic), ``flip`` (horizontal flip),
            ``standard`` (random resized crop + flip), ``randaugment`` (standard + RandAugment).
        image_size: input size in pixels (square); null uses the backbone's pretrained size.
        predict_dir: folder of images (searched recursively) for `tl predict`.
        target_root: domain adaptation only: the unlabelled target domain. Its training images
            are ``target_root/train/`` (any sub-folders; their names are ignored) or, without
            a ``train/`` folder, every image outside ``val/`` and ``test/``. Labelled
            ``target_root/val/<class>/`` and ``test/<class>/`` only report target accuracy.
        cache_features: reuse the frozen backbone's output ("bottleneck features") across
            epochs and runs. ``auto``: when the backbone stays frozen for the whole run (train:
            also ``augment`` none); ``true``: the same, an error where it cannot be right;
            ``false``: recompute every epoch.
        cache_images: keep images decoded and resized once, as uint8 (in memory if they take at
            most 1/4 of the memory the job may use, shared by its processes on the node, else
            memory-mapped), and augment tensors. ``auto`` and ``true``: whenever features are
            not cached; ``false``: decode every file every epoch.
        cache_dir: where caches live; null: ``$TL_CACHE_DIR`` or ``~/.cache/tl``.
        on_bad_image: what to do with files that cannot be decoded (every image is decoded
            once before the first epoch, in the same pass that fills the caches; the result is
            remembered until the files change): ``error`` stops with the list of bad files;
            ``skip`` leaves them out (and files that are not images) and names each; a class
            left without images stops the run. Either way ``fit`` warns about val/ and test/
            files that are byte-identical copies of training images.
        stage: copy ``train/``, ``val/`` and ``test/`` to node-local disk once per node, check
            the copy, and read it for the rest of the job. ``auto``: in a SLURM job, to
            ``$SLURM_TMPDIR``, Expanse's ``/scratch/$USER/job_$SLURM_JOB_ID`` or a job ``$TMPDIR``;
            nothing off a cluster. ``none``: read ``root`` in place. A folder: there.
        steps_per_epoch: deprecated: use min_steps_per_epoch.
    """

    def __init__(
        self,
        root: str = "data/catsVsDogs",
        batch_size: int = 32,
        min_steps_per_epoch: Optional[int] = None,
        num_workers: Optional[int] = None,
        augment: Augment = "none",
        image_size: Optional[int] = None,
        predict_dir: Optional[str] = None,
        target_root: Optional[str] = None,
        cache_features: CacheMode = "auto",
        cache_images: CacheMode = "auto",
        cache_dir: Optional[str] = None,
        on_bad_image: Literal["error", "skip"] = "error",
        stage: str = "auto",
        steps_per_epoch: Optional[int] = None,
    ) -> None:
        super().__init__()
        if steps_per_epoch is not None:
            warn_deprecated("data.steps_per_epoch", "data.min_steps_per_epoch")
            min_steps_per_epoch = steps_per_epoch
        _check_sizes(batch_size, min_steps_per_epoch, image_size)
        self.root = Path(root)
        self.staging, self._read_root = stage, Path(root)  # data.stage; where the images are read
        self.min_steps_per_epoch = min_steps_per_epoch
        self.batch_size, self.num_workers, self.augment, self.image_size = batch_size, num_workers, augment, image_size
        self.predict_dir = Path(predict_dir) if predict_dir else None
        self.target_root = Path(target_root) if target_root else None
        self.cache_features, self.cache_images, self.cache_dir = cache_features, cache_images, cache_dir
        self.on_bad_image = on_bad_image
        self.class_names: Optional[list[str]] = None
        self.preprocessing: Optional[dict[str, Any]] = None
        self._extractor: Optional[Extractor] = None
        self._samples: dict[str, list[tuple[Path, int]]] = {}
        self._datasets: dict[str, Dataset] = {}
        self._seed: Optional[int] = None
        self._resume: Optional[dict[str, int]] = None

    # -- the model's side of the hook -------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage != "predict" and not self.root.is_dir():
            raise TLError(
                f"data.root={str(self.root)!r} does not exist. Point --data.root at a folder with "
                "train/ and val/ (and test/) class folders, or make one with "
                "`tl data synth DIR` / `tl data split SRC DIR`."
            )
        if stage != "predict":
            self._read_root = stage_data(self.root, self.staging, ("train", "val", "test"), say)
        split = {"fit": "train", "validate": "val", "test": "test"}.get(stage)
        self._samples, self._datasets = {}, {}
        try:  # every rank reads the same layout and meets its errors alike: rank 0 says them
            if split and self.class_names is None:
                with named_as(self._read_root, self.root):
                    self.class_names = class_folders(self._read_root / split)
            if stage == "fit":
                train, val = self.samples("train"), self.samples("val")
        except TLError as exc:
            distributed.printed_by_rank_zero(exc)
            raise
        if stage == "fit":  # copies of training images in val/ or test/ are warned about (rank 0)
            test = (lambda: self.samples("test")) if (self._read_root / "test").is_dir() else list
            check = (train, val, test, self._read_root, self.root, cache_root(self.cache_dir), say)
            distributed.on_rank_zero(lambda: warn_about_leaks(*check), distributed.timeout_for(len(train) + len(val)))

    def offer_features(self, extractor: Extractor) -> None:
        """The backbone stays frozen for the whole run: its output may be cached."""
        self._extractor = extractor

    def resume_at(self, epoch: int, batches: int) -> None:
        """A resumed run continues `epoch` after `batches` batches (set by `ExactResume`)."""
        self._resume = {"epoch": epoch, "batches": batches}

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class, in class order: the files in the split's folders, without those that
        ``data.on_bad_image skip`` leaves out."""
        if self.on_bad_image == "skip" and self.preprocessing is not None:
            self.dataset_for(split)  # the first pass: what it leaves out is not counted
        counts = collections.Counter(label for _, label in self.samples(split))
        return [counts[i] for i in range(len(self.class_names or []))]

    def paths(self, split: str) -> list[Path]:
        """The files of a split in the order its loader's ``index`` refers to."""
        return [p for p, _ in self.samples(split)]

    # -- samples ----------------------------------------------------------------------------

    def samples(self, split: str) -> list[tuple[Path, int]]:
        """``(path, label)`` of a split: ``train``/``val``/``test``, ``target_<split>``, ``predict``."""
        if split not in self._samples:
            if self.class_names is None and split != "predict":
                raise TLError("ImageFolderData needs class_names (run setup, or set them) before loading data.")
            skip = self.on_bad_image == "skip"  # other files are screened out, each named
            if split == "predict":
                self._samples[split] = [(p, -1) for p in predict_images(self.predict_dir)]
            elif split == "target_train":
                self._samples[split] = [(p, -1) for p in target_train_images(self.target_root, skip)]
            elif split.startswith("target_"):
                folder = self.target_root / split.removeprefix("target_")
                self._samples[split] = labelled_samples(folder, self.class_names, "the source (data.root)", skip)
            else:
                reference = "train/" if split == "train" else "the model's classes"
                with named_as(self._read_root, self.root):
                    self._samples[split] = labelled_samples(self._read_root / split, self.class_names, reference, skip)
        return self._samples[split]

    def _folder(self, split: str) -> Path:
        if not split.startswith("target_"):
            return self.root / split  # the source's name in messages, even when read from a copy
        folder = self.target_root / split.removeprefix("target_")
        return folder if folder.is_dir() or split != "target_train" else self.target_root

    def has_target(self, split: str) -> bool:
        return self.target_root is not None and (self.target_root / split).is_dir()

    # -- what the loaders iterate -------------------------------------------------------------

    def dataset_for(self, split: str) -> Dataset:
        """The dataset a loader of `split` iterates: cached features, cached images, or files."""
        if split in self._datasets:
            return self._datasets[split]
        if self.preprocessing is None:
            raise TLError("ImageFolderData needs preprocessing (set by the model) before loading data.")
        prep, augment = self.preprocessing, self.augment if split.endswith("train") else "none"
        features = split in ("train", "val") and features_wanted(self.cache_features, self._extractor, augment)
        images = not features and self.cache_images is not False
        if split == "predict":
            dataset: Dataset = ImageFiles(self.samples(split), prep, crop_pipeline("none", prep), tolerant=True)
        else:
            ready = screen_and_cache(
                self._folder(split),
                self.samples(split),
                prep,
                cache_dir=cache_root(self.cache_dir),
                on_bad_image=self.on_bad_image,
                images=images,
                extractor=self._extractor if features else None,
                batch_size=self.batch_size,
                workers=default_workers(self.num_workers),
                ram_budget=image_ram_budget(self._processes_on_node()),
                say=say,
                staged=None if self._read_root == self.root else (self._read_root.resolve(), self.root.resolve()),
                name=split.replace("_", " "),  # target_train: "target train", not the folder's "train"
            )
            self._samples[split] = ready.samples
            labels = [label for _, label in ready.samples]
            if ready.features is not None:
                dataset = FeatureDataset(ready.features, labels)
            elif ready.images is not None:
                dataset = CachedImages(*ready.images, labels, crop_pipeline(augment, prep), file=ready.image_file)
            else:
                dataset = ImageFiles(ready.samples, prep, crop_pipeline(augment, prep))
        self._datasets[split] = dataset
        return dataset

    # -- loaders ------------------------------------------------------------------------------

    def _trainer(self) -> Optional[pl.Trainer]:
        return getattr(self, "trainer", None)

    def _processes_on_node(self) -> int:
        trainer = self._trainer()
        return trainer.num_devices if trainer is not None else 1

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        dataset = self.dataset_for(split)
        # features are tensors in memory already: worker processes would only add latency
        workers = 0 if isinstance(dataset, FeatureDataset) else default_workers(self.num_workers)
        if self._seed is None:  # the same order on every rank, whatever each was seeded with
            self._seed = distributed.broadcast(torch.initial_seed() % 2**31)
        sampler = None
        if shuffle:
            world = distributed.world_size()
            sampler = ResumableSampler(
                len(dataset),
                self._seed,
                world,
                distributed.rank(),
                passes_for(self.min_steps_per_epoch, len(dataset), world, self.batch_size),
            )
            if self._resume:
                sampler.resume_at(batch_size=self.batch_size, **self._resume)
        elif split in ("val", "target_val"):
            sampler = validation_sampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0 and split in ("train", "val", "target_train", "target_val"),
            **worker_options(workers),
            # a generator of its own: starting an epoch never draws from the global generator
            # (dropout's), so a run resumed mid-epoch draws what the uninterrupted one drew
            generator=torch.Generator().manual_seed(self._seed),
        )

    def train_dataloader(self) -> Any:
        source = self._loader("train", shuffle=True)
        if self.target_root is None:
            return source
        target = self._loader("target_train", shuffle=True)
        return CombinedLoader({"source": source, "target": target}, mode="max_size_cycle")

    def val_dataloader(self) -> Any:
        loaders = [self._loader("val")]
        if self.has_target("val"):
            loaders.append(self._loader("target_val"))
        return loaders if len(loaders) > 1 else loaders[0]

    def test_dataloader(self) -> Any:
        loaders = [self._loader("test")]
        if self.has_target("test"):
            loaders.append(self._loader("target_test"))
        return loaders if len(loaders) > 1 else loaders[0]

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
