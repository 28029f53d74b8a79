"""Before the first epoch: every image decoded once, the bad ones found, the caches filled.

One pass over a split does all of it: each file is decoded fully (a truncated JPEG fails
only at its last bytes), the result of the screening is remembered per file set, and the
decoded picture goes straight on into the decoded-image cache and/or through the frozen
backbone into the bottleneck-feature cache. A later run with the same files reads the
remembered screening result and the caches and decodes nothing.

Under DDP the ranks that see the same cache folder (`sharing.folder_group`: all of them for a
shared folder, a node's ranks for node-local scratch) build its entries once: each does its
share, writes its part, and the group's first rank joins the parts. Every decision (what is
bad) is rank 0's group's, so the ranks never take different paths. A failure on any rank
stops all of them with its message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tl_cli.cluster import distributed
from tl_cli.data.cache import FeatureStore, ImageStore, ScreenStore, files_fingerprint, make_key, source_name
from tl_cli.data.datasets import as_is, worker_options
from tl_cli.data.folders import IMAGE_SUFFIXES
from tl_cli.data.sharing import folder_group
from tl_cli.data.transforms import crop_pipeline, decode_resized, resize_side
from tl_cli.errors import TLError

Samples = list[tuple[Path, int]]


@dataclass
class Extractor:
    """What the feature cache needs from a frozen backbone (handed over by `FreezeBackbone`).

    Attributes:
        extract: uint8 images ``[B, 3, H, W]`` (centre crops) -> features ``[B, dim]`` on CPU.
        identity: what the features depend on besides the images (backbone, weights hash,
            precision), for the cache key.
        dim: feature width.
        device: where the backbone runs (asked when the pass starts).
    """

    extract: Callable[[torch.Tensor], torch.Tensor]
    identity: Callable[[], dict[str, Any]]
    dim: int
    device: Callable[[], torch.device] = lambda: torch.device("cpu")


@dataclass
class Prepared:
    """A split after `screen_and_cache`: its usable samples and their caches, if asked for."""

    samples: Samples  # the usable samples, in order
    images: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None
    features: Optional[torch.Tensor] = None
    image_file: Optional[Path] = None  # the cache file `images` was read from


class _Decode(Dataset):
    """``(problem or None, uint8 [3, H, W] or None)`` per sample; with `inspect`, the full
    check of `tl data check` (a decode that succeeds only after conversion counts as good)."""

    def __init__(self, samples: Samples, preprocessing: dict[str, Any], inspect: bool) -> None:
        self.samples, self.preprocessing, self.inspect = samples, preprocessing, inspect

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Optional[str], Optional[torch.Tensor]]:
        from tl_cli.data.screening import inspect_image

        path = self.samples[i][0]
        if not self.inspect:
            return None, decode_resized(path, self.preprocessing)
        # by extension first, as `tl data check` does: a file PIL happens to open (.ico, .tga)
        # is no more an image here than when data.on_bad_image is error
        info = inspect_image(path, IMAGE_SUFFIXES, digest=False, keep=True, shrink_to=resize_side(self.preprocessing))
        if info["error"]:
            return info["error"], None
        return None, decode_resized(info["image"], self.preprocessing)


def _share_pass(
    samples: Samples,
    preprocessing: dict[str, Any],
    *,
    inspect: bool,
    image_store: Optional[ImageStore],
    feature_store: Optional[FeatureStore],
    extractor: Optional[Extractor],
    batch_size: int,
    workers: int,
    part: Optional[int],
) -> list[tuple[int, str]]:
    """Decode `samples` once; fill the stores; return the bad ones: (position, problem).

    Without `part` (one process) bad samples are left out of the entries; with it, they are
    placeholders (an empty image, zero features) that `join` leaves out.
    """
    if extractor is not None and extractor.device().type == "cpu":
        # the backbone takes the cores: decoding in worker processes beside it oversubscribes
        # them (its threads spin-wait), and the pass gets twice slower; decode in between
        workers = 0
    loader = DataLoader(
        _Decode(samples, preprocessing, inspect),
        batch_size=None,
        collate_fn=as_is,
        prefetch_factor=8 if workers else None,
        **worker_options(workers),
        generator=torch.Generator().manual_seed(0),  # the global generator stays untouched
    )
    bad: list[tuple[int, str]] = []
    crop = crop_pipeline("none", preprocessing)
    features: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            features.append(extractor.extract(torch.stack(pending)))
            pending.clear()

    def arrays() -> Iterator[np.ndarray]:
        for position, (problem, image) in enumerate(loader):
            if problem is not None:
                bad.append((position, problem))
                if part is not None:
                    if extractor is not None:
                        flush()
                        features.append(torch.zeros(1, extractor.dim))
                    yield np.zeros((0, 0, 3), dtype=np.uint8)
                continue
            if extractor is not None:
                pending.append(crop(image))
                if len(pending) == batch_size:
                    flush()
            yield image.permute(1, 2, 0).numpy()
        if extractor is not None:
            flush()

    # building leaves the random number generators as they were, so a run that fills the
    # caches draws the same dropout masks as one that finds them filled
    with torch.random.fork_rng(devices=[]):
        if image_store is not None:
            image_store.build(arrays(), part=part)
        else:
            for _ in arrays():
                pass
    if feature_store is not None:
        dim = extractor.dim
        feature_store.save(torch.cat(features) if features else torch.empty(0, dim), part=part)
    return bad


def screen_and_cache(
    where: Path,
    samples: Samples,
    preprocessing: dict[str, Any],
    *,
    cache_dir: Path,
    on_bad_image: str,
    images: bool,
    extractor: Optional[Extractor],
    batch_size: int,
    workers: int,
    ram_budget: int,
    say: Callable[[str], None],
    staged: Optional[tuple[Path, Path]] = None,
    name: Optional[str] = None,
) -> Prepared:
    """Screen `samples` for bad images (the result is remembered per file set) and load or
    build the caches asked for: decoded images (`images`), bottleneck features (`extractor`).

    `staged` is (copy, source) when the samples are a staged copy (``data.stage``): entries and
    messages name the source's files; `name` is the split as messages call it (default: the
    folder's). Returns the usable samples and what was cached of them.
    """
    screen = ScreenStore(cache_dir, make_key("check", files=files_fingerprint(samples, staged)))
    known = distributed.broadcast(screen.load())
    kept = samples if known is None else _apply(where, samples, known, on_bad_image, say, staged)

    def stores(of: Samples) -> tuple[Optional[ImageStore], Optional[FeatureStore]]:
        files = files_fingerprint(of, staged)
        image_store = feature_store = None
        if images:
            key = make_key("images", files=files, preprocessing=preprocessing)
            image_store = ImageStore(cache_dir, key)
        if extractor is not None:
            key = make_key("features", files=files, preprocessing=preprocessing, model=extractor.identity())
            feature_store = FeatureStore(cache_dir, key)
        return image_store, feature_store

    def loaded(of: Samples) -> tuple[Any, Any, Optional[Path]]:
        """The images, the features, and the cache file the images were read from."""
        image_store, feature_store = stores(of)
        got_images = image_store.load(len(of), ram_budget) if image_store else None
        got_features = feature_store.load(len(of), extractor.dim) if feature_store else None
        return got_images, got_features, image_store.data_path if got_images is not None else None

    # ranks that see the same cache folder (a node's local scratch, or one shared folder for
    # all) build its entries once, together; every group builds its own
    group = folder_group(cache_dir)
    build = True
    if known is not None:
        got_images, got_features, image_file = loaded(kept)
        lacking = (images and got_images is None) or (extractor is not None and got_features is None)
        missing = distributed.on_every_rank(lambda: lacking, distributed.timeout_for(len(kept), 0.0))
        if not any(missing):
            _report(say, name or where.name, len(kept), got_images, got_features, None)
            return Prepared(kept, got_images, got_features, image_file)
        build = any(missing[r] for r in group.ranks)
    start = time.perf_counter()
    todo = samples if known is None else kept
    image_store, feature_store = stores(todo)
    share = group.size
    mine = todo[group.index :: share] if build else []
    # the same timeout on every rank (it names the gloo group), whatever its share
    timeout = distributed.timeout_for(len(todo))
    bad_parts = distributed.on_every_rank(
        lambda: (
            _share_pass(
                mine,
                preprocessing,
                inspect=known is None,
                image_store=image_store,
                feature_store=feature_store,
                extractor=extractor,
                batch_size=batch_size,
                workers=workers,
                part=group.index if share > 1 else None,
            )
            if build
            else []
        ),
        timeout,
    )
    # every decision is rank 0's group's, so all ranks keep the same samples
    first = distributed.on_every_rank(lambda: group.ranks, timeout)[0]
    bad = sorted((i + len(first) * p, problem) for i, r in enumerate(first) for p, problem in bad_parts[r])
    if known is None:
        problems = [{"path": source_name(todo[i][0], staged), "problem": problem} for i, problem in bad]
        if group.leader:
            screen.save(problems)
        kept = _apply(where, samples, problems, on_bad_image, say, staged)
    final_images, final_features = stores(kept)

    def finish() -> None:  # a group's leader: the entries of `kept` from what the pass wrote
        drop = {i for i, _ in bad}
        for written, final in ((image_store, final_images), (feature_store, final_features)):
            if written is not None and share > 1:
                written.join_into(final, share, drop)
            elif written is not None and len(kept) != len(todo):
                written.move_to(final)

    distributed.on_every_rank(
        lambda: finish() if build and group.leader else None, distributed.timeout_for(len(todo), 0.01)
    )
    got_images, got_features, image_file = loaded(kept)
    if (images and got_images is None) or (extractor is not None and got_features is None):
        raise RuntimeError(f"the cache entries for {where} are missing right after they were built")
    _report(say, name or where.name, len(kept), got_images, got_features, time.perf_counter() - start)
    return Prepared(kept, got_images, got_features, image_file)


def _apply(
    where: Path,
    samples: Samples,
    bad: list[dict[str, str]],
    on_bad_image: str,
    say: Callable,
    staged: Optional[tuple[Path, Path]] = None,
) -> Samples:
    """`on_bad_image`: stop with the list of bad files, or leave them out and name each."""
    if not bad:
        return samples
    listing = "\n  ".join(f"{b['path']}: {b['problem']}" for b in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    if on_bad_image == "error":
        raise distributed.printed_by_rank_zero(
            TLError(
                f"{len(bad)} file(s) in {where} cannot be used:\n  {listing}{more}\n"
                "Remove or replace them, or pass --data.on_bad_image skip to train without them "
                f"(`tl data check {where.parent}` reports every problem)."
            )
        )
    for b in bad:
        say(f"warning: skipping {b['path']}: {b['problem']} (data.on_bad_image=skip)")
    dropped = {b["path"] for b in bad}  # absolute source paths (as given, in older entries)
    kept = [(p, label) for p, label in samples if str(p) not in dropped and source_name(p, staged) not in dropped]
    if samples and not kept and all(label < 0 for _, label in samples):  # unlabelled: DA's target
        raise distributed.printed_by_rank_zero(
            TLError(
                f"With its bad files left out (data.on_bad_image=skip), {where} has no usable images "
                "left. Fix or replace those files (listed above), or point data.target_root at a "
                "folder with images that decode."
            )
        )
    emptied = sorted({label for _, label in samples if label >= 0} - {label for _, label in kept})
    if emptied:  # a class that only had bad files: training would go on without it
        folders = [_class_folder(where, next(p for p, label in samples if label == e), staged) for e in emptied]
        raise distributed.printed_by_rank_zero(
            TLError(
                f"With its bad files left out (data.on_bad_image=skip), class folder(s) "
                f"{', '.join(folders)} have no usable images left. Fix or replace those files "
                "(listed above), or remove the class folder from every split."
            )
        )
    return kept


def _class_folder(where: Path, path: Path, staged: Optional[tuple[Path, Path]]) -> str:
    """The class folder (under `where`, the split as the user named it) that lists `path`: by
    the path as listed, not resolved (a symlinked image names its class folder, not its target)."""
    path = Path(path)
    if staged is not None and path.resolve().is_relative_to(staged[0]):
        return str(where / path.resolve().relative_to(staged[0]).parts[1])  # <copy>/<split>/<class>/...
    return str(where / path.relative_to(where).parts[0]) if path.is_relative_to(where) else str(path.parent)


def _report(say: Callable, name: str, n: int, images: Any, features: Any, seconds: Optional[float]) -> None:
    how = "loaded" if seconds is None else f"prepared in {seconds:.1f} s"
    if features is not None:
        say(f"{name}: bottleneck features of {n} images {how}")
    elif images is not None:
        data = images[0]
        kind = "memory-mapped" if isinstance(data, np.memmap) else "in memory"
        say(f"{name}: {n} decoded images {how}, {data.nbytes / 2**20:.0f} MiB {kind}")
    elif seconds is not None:
        say(f"{name}: {n} images checked in {seconds:.1f} s")
