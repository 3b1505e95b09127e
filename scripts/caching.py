"""Where training and validation keep their preprocessed cases between epochs: in memory, on disk or nowhere.

MONAI's datasets run a case's transforms up to the first random one (``RandomizableTrait``) once, keep the result
and run the rest on every access: ``memory`` is a ``CacheDataset``, ``disk`` a ``PersistentDataset`` in a folder
(for datasets that do not fit in RAM), ``none`` a plain ``Dataset`` that preprocesses anew each time. All three
give the same training; RAM per case and settings per machine: docs/training.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.utils import convert_to_tensor, ensure_tuple

from scripts.atomic import atomic_output, remove_stale_temporaries
from scripts.errors import InputError

CACHE_MODES = ("memory", "disk", "none")


def case_hash(case: Mapping[str, Any]) -> bytes:
    """Hash of a datalist entry and of the size and modification time of every file it names, so that a file
    replaced under the same path (a corrected label, a new release) is preprocessed again rather than read stale."""
    files = [path for value in case.values() for path in ensure_tuple(value) if isinstance(path, str)]
    stats = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files if os.path.isfile(path)]
    return pickle_hashing([dict(case), stats])


class DiskCacheDataset(PersistentDataset):
    """``PersistentDataset`` whose files are named after the cached transforms' parameters as well as the case, and
    appear whole or not at all.

    The transform part of the name is MONAI's ``hash_transform`` with ``pickle_hashing``: it covers each transform's
    settings (``json_hashing`` falls back to the class names, so a changed spacing would reuse a stale cache).
    Cases are stored without their metadata (MONAI's default ``track_meta=False``, which ``torch.load`` with
    ``weights_only`` reads); every epoch, the first included, gets them so.
    """

    def __init__(self, data: Sequence, transform: Callable, cache_dir: str | Path):
        super().__init__(data, transform, cache_dir, hash_func=case_hash, hash_transform=pickle_hashing)
        remove_stale_temporaries(self.cache_dir)

    def cache_path(self, case: Mapping[str, Any]) -> Path:
        """The file that holds `case` preprocessed (MONAI's naming: case hash, then transform hash)."""
        return self.cache_dir / f"{self.hash_func(case).decode('utf-8')}{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed: Mapping[str, Any]) -> Any:
        # MONAI writes a new file in the system's temporary folder and moves it here; across file systems (a /tmp in
        # RAM, the cache on disk) the move is a copy, so a run killed meanwhile leaves half a file that every later
        # run fails to load. Written beside its final name and renamed (scripts.atomic), it is whole or absent.
        path = self.cache_path(item_transformed)
        if path.is_file():
            return super()._cachecheck(item_transformed)
        cached = convert_to_tensor(
            self._pre_transform(deepcopy(item_transformed)), convert_numeric=False, track_meta=self.track_meta
        )
        with atomic_output(path, suffix=".pt") as temporary:
            torch.save(cached, temporary, pickle_protocol=self.pickle_protocol)
        return cached


def cached_dataset(
    data: Sequence,
    transform: Callable,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    progress: bool = True,
) -> Dataset:
    """The dataset of `data` under `transform` that keeps the deterministic part of each case as `cache` says:
    ``memory`` (``cache_rate`` of the cases, filled by ``num_workers`` threads), ``disk`` (in ``cache_dir``) or
    ``none``."""
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers, progress=progress)
    if cache == "disk":
        if not cache_dir:
            raise InputError("cache: disk needs a cache_dir (a folder for the preprocessed cases)")
        return DiskCacheDataset(data, transform, cache_dir)
    if cache == "none":
        return Dataset(data, transform)
    raise InputError(f"cache: {cache!r} is not one of {', '.join(CACHE_MODES)}")
