"""Print the RAM that train.yaml's memory cache (`cache: memory`) takes per case, for training and for validation.

Full-size synthetic cases (240 x 240 x 155 voxels of 1 mm, scripts.synthetic) are written to a temporary folder
unless --dataset_dir names a folder of BraTS cases. Each section's chain is the config's own (`train#preprocessing`,
`validate#preprocessing`) and is cached as MONAI's CacheDataset caches it; printed are the bytes of the cached
tensors per case and the growth of the process's resident memory, then what a fold's cache takes for 99 and 257
cases (4/5 of them training, 1/5 validation). docs/training.md has the table.

python -m scripts.benchmark_cache [--num_cases 4] [--dataset_dir DIR] [--spacing 1.0] [--config_file FILE]
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Mapping

import fire
import torch
from monai.bundle import ConfigParser
from monai.data import CacheDataset

from scripts.cases import case_files, find_case_dirs
from scripts.errors import exit_on_input_error
from scripts.synthetic import generate_dataset

MB = 1e6
RELEASES = {"BraTS-PEDs 2023": 99, "BraTS-PEDs 2024": 257}
TRAINING_SHARE = 0.8  # five folds: a fold trains on 4/5 of the cases and validates on 1/5


def cached_bytes(case: Mapping) -> dict[str, int]:
    """Bytes of the tensors of a cached case, by key (lists of tensors, e.g. crop indices, summed)."""
    sizes = {}
    for key, value in case.items():
        tensors = value if isinstance(value, list | tuple) else [value]
        tensors = [tensor for tensor in tensors if isinstance(tensor, torch.Tensor)]
        if tensors:
            sizes[key] = sum(tensor.nbytes for tensor in tensors)
    return sizes


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(cases: list[dict], parser: ConfigParser, section: str) -> float:
    """Print what `section`'s cache holds per case; return its MB per case."""
    transform = parser.get_parsed_content(f"{section}#preprocessing")
    CacheDataset(cases[:1], transform, num_workers=0, progress=False)  # warm-up: lazy imports, allocator pools
    gc.collect()
    before = resident_bytes()
    dataset = CacheDataset(cases, transform, num_workers=0, progress=False)
    gc.collect()
    grown = (resident_bytes() - before) / MB / len(cases)
    sizes = [cached_bytes(case) for case in dataset._cache]
    per_key = {key: sum(size[key] for size in sizes) / MB / len(cases) for key in sizes[0]}
    dtypes = {key: str(value.dtype) for key, value in dataset._cache[0].items() if isinstance(value, torch.Tensor)}
    shape = tuple(dataset._cache[0]["image"].shape[1:])
    total = sum(per_key.values())
    details = ", ".join(f"{key} {mb:.1f} ({dtypes.get(key, 'list')})" for key, mb in per_key.items())
    print(f"{section}: {total:.1f} MB per case in tensors ({details}); resident memory grew {grown:.1f} MB per case")
    print(f"  cached grid of the first case: {shape}")
    return total


def main(
    num_cases: int = 4,
    dataset_dir: str | None = None,
    spacing: float = 1.0,
    config_file: str = "configs/train.yaml",
    label_scheme: str = "brats2023_ped",
) -> None:
    """Print the memory cache's MB per case (training, validation) and a fold's cache for 99 and 257 cases."""
    with tempfile.TemporaryDirectory() as temporary:
        if dataset_dir is None:
            dataset_dir = temporary
            generate_dataset(dataset_dir, num_train=num_cases, num_val=0, seed=0, label_scheme=label_scheme)
        cases = [case_files(folder) for folder in find_case_dirs(dataset_dir)[:num_cases]]
        parser = ConfigParser()
        parser.read_config(config_file)
        parser.update({"spacing": [float(spacing)] * 3, "label_scheme": label_scheme})
        print(f"{len(cases)} cases of {dataset_dir} at {spacing} mm, chains of {config_file}")
        train, validate = (measure(cases, parser, section) for section in ("train", "validate"))
    per_case = TRAINING_SHARE * train + (1 - TRAINING_SHARE) * validate
    for release, count in RELEASES.items():
        print(f"{release}, {count} cases: a fold's cache holds {count * per_case / 1000:.1f} GB")


if __name__ == "__main__":
    with exit_on_input_error():
        fire.Fire(main)
