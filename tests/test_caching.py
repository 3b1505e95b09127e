"""Where preprocessed cases are kept (scripts/caching.py, train.yaml's `cache`): uint8 labels, validation regions
made after the cache, memory and disk caches training alike; disk files that are never stale or partial."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.transforms import Compose, EnsureTyped, Lambdad

from scripts.atomic import is_temporary
from scripts.caching import DiskCacheDataset, cached_dataset
from scripts.errors import InputError
from scripts.labels import LabelsToRegionsd
from tests.conftest import leave_a_temporary, train_workflow


def train_one_epoch(dataset_dir: Path, datalist: Path, output_dir: Path, **overrides) -> tuple[list, dict]:
    """(the batches trained on, validation metrics) of the tiny one-epoch training with `overrides`."""
    # Outputs start at 0.5 rather than the config's low prior, so that after one tiny epoch the predictions are
    # neither empty nor everything: equal Dice values then mean equal predictions.
    workflow = train_workflow(dataset_dir, datalist, output_dir, run_id="training", output_prior=0.5, **overrides)
    batches = []

    def keep_batch(engine) -> None:
        batches.append({key: engine.state.batch[key].clone() for key in ("image", "label")})

    workflow.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_STARTED, keep_batch)
    workflow.run()
    return batches, workflow.parser.get_parsed_content("validate#evaluator").state.metrics


def test_disk_cache_trains_as_the_memory_cache(synthetic_dataset, synthetic_datalist, tmp_path):
    cache_dir = tmp_path / "cache"
    batches, metrics = train_one_epoch(synthetic_dataset, synthetic_datalist, tmp_path / "memory")
    runs = {"disk": train_one_epoch(synthetic_dataset, synthetic_datalist, tmp_path / "disk", **disk(cache_dir))}
    files = {path: path.stat().st_mtime_ns for path in cache_dir.iterdir()}
    assert len(files) == 6 and all(path.suffix == ".pt" for path in files)  # 4 training + 2 validation cases
    runs["disk, read back"] = train_one_epoch(
        synthetic_dataset, synthetic_datalist, tmp_path / "disk2", **disk(cache_dir)
    )
    assert {path: path.stat().st_mtime_ns for path in cache_dir.iterdir()} == files  # read, not written again
    assert 0.0 < metrics["val_mean_dice"] < 1.0 and len(batches) > 1
    for name, (other_batches, other_metrics) in runs.items():
        # The same crops, exactly: preprocessing and random augmentation are exact on the CPU. The weights are not
        # compared: two memory-cache runs already differ by about 1e-7 (threaded float sums), and Adam's normalised
        # step can turn such noise in a near-zero gradient into a step of the learning rate. That noise can move a
        # voxel across the threshold too (one CI run saw WT Dice 0.0510393 against 0.0510375), hence rel=1e-3.
        assert len(other_batches) == len(batches), name
        for batch, other in zip(batches, other_batches, strict=True):
            assert all(torch.equal(batch[key], other[key]) for key in batch), name
        assert other_metrics == pytest.approx(metrics, rel=1e-3), name


def disk(cache_dir: Path) -> dict:
    return {"cache": "disk", "cache_dir": str(cache_dir)}


@pytest.fixture(scope="module")
def workflow(synthetic_dataset, synthetic_datalist, tmp_path_factory):
    return train_workflow(synthetic_dataset, synthetic_datalist, tmp_path_factory.mktemp("fold0"))


def test_labels_are_cached_as_uint8_and_validation_regions_made_after_the_cache(workflow):
    parse = workflow.parser.get_parsed_content
    for section in ("train", "validate"):
        cached = parse(f"{section}#dataset")._cache
        assert len(cached) > 0 and all(case["label"].dtype == torch.uint8 for case in cached), section
        assert all(case["image"].dtype == torch.float32 for case in cached), section
    # What validation cached before: the float32 label's regions, made before the cache.
    before = Compose(
        [
            transform
            for transform in parse("preprocessing_transforms")
            if not (isinstance(transform, EnsureTyped) and transform.keys == ("label",))
        ]
        + [LabelsToRegionsd(keys="label", label_scheme=parse("label_scheme"))]
    )
    dataset = parse("validate#dataset")
    for index, case in enumerate(parse("fold_split")[1]):
        expected, served = before(dict(case)), dataset[index]
        assert served["label"].dtype == torch.float32 and served["label"].shape[0] == 3
        assert torch.equal(served["label"], expected["label"]) and served["label"].sum() > 0
        assert torch.equal(served["image"], expected["image"])


def test_disk_cache_file_names_follow_the_preprocessing_and_the_files(synthetic_dataset, synthetic_datalist, tmp_path):
    def disk_dataset(**overrides) -> DiskCacheDataset:
        workflow = train_workflow(
            synthetic_dataset, synthetic_datalist, tmp_path / "fold0", **disk(tmp_path), **overrides
        )
        return workflow.parser.get_parsed_content("validate#dataset")

    dataset = disk_dataset()
    case = dict(dataset.data[0])
    path = dataset.cache_path(case)
    assert disk_dataset().cache_path(case) == path  # the same settings in another run: the same file
    assert disk_dataset(spacing=[3.0, 3.0, 3.0]).cache_path(case) != path
    label = Path(case["label"])
    stat = label.stat()
    try:
        os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # the label replaced under the same name
        assert dataset.cache_path(case) != path
    finally:
        os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def square(value: torch.Tensor) -> torch.Tensor:
    return value**2


SQUARE = Compose([Lambdad(keys="value", func=square)])  # a deterministic MONAI transform: cached


def test_a_failed_write_leaves_no_cache_file_and_the_case_is_preprocessed_again(tmp_path, monkeypatch):
    data = [{"value": torch.tensor([3.0])}]
    dataset = DiskCacheDataset(data, SQUARE, tmp_path)
    path = dataset.cache_path(data[0])

    save = torch.save

    def killed_while_writing(obj, file, **kwargs) -> None:
        if not isinstance(file, str | Path):  # an in-memory copy, not the cache file
            return save(obj, file, **kwargs)
        Path(file).write_bytes(b"half a file")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            dataset[0]
    assert list(tmp_path.iterdir()) == []
    assert dataset[0]["value"] == 9.0 and path.is_file()
    assert torch.load(path)["value"] == 9.0


def test_temporaries_of_killed_runs_are_removed(tmp_path):
    temporary = leave_a_temporary(tmp_path / "case.pt")
    DiskCacheDataset([], SQUARE, tmp_path)
    assert not temporary.exists()
    assert not [path for path in tmp_path.iterdir() if is_temporary(path)]


@pytest.mark.parametrize(
    ("settings", "problem"),
    [({"cache": "ram"}, "cache: 'ram' is not one of memory, disk, none"), ({"cache": "disk"}, "needs a cache_dir")],
)
def test_bad_cache_settings_are_named(settings, problem):
    with pytest.raises(InputError, match=problem):
        cached_dataset([], SQUARE, **settings)


def test_memory_cache_keeps_a_share_of_cases():
    dataset = cached_dataset([{"value": np.float32(v)} for v in range(4)], SQUARE, cache_rate=0.5)
    assert len(dataset._cache) == 2 and [case["value"] for case in dataset] == [0, 1, 4, 9]
