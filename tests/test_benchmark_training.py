"""The training benchmark runs both configs through their own workflow and prints consistent figures."""

from __future__ import annotations

import pytest

from scripts.benchmark_training import COLUMNS, main
from tests.conftest import TINY_TRAINING

# The tests' tiny network and grid; the configs' own schedule and crops per case, so that the configs' differences
# show in the table.
TINY_BENCHMARK = {
    key: value for key, value in TINY_TRAINING.items() if key not in ("num_epochs", "val_interval", "crops_per_case")
}


def table(output: str) -> dict[str, dict[str, str]]:
    """{config: {column: cell}} of the printed table."""
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] in ("demo", "default") and len(cells) == len(COLUMNS):
            rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return rows


def test_benchmark_prints_consistent_figures_of_both_configs(synthetic_dataset, capfd):
    main(configs="both", num_cases=2, iterations=1, dataset_dir=str(synthetic_dataset), overrides=TINY_BENCHMARK)
    output, progress = capfd.readouterr()
    rows = table(output)
    assert set(rows) == {"demo", "default"}
    for name, row in rows.items():
        assert row["spacing_mm"] == "4" and row["roi"] == "64x64x64" and row["feature"] == "12"
        assert row["AMP"] == "no" and row["peak_GPU_GB"] == "-"  # no GPU here
        assert row["iterations"] == "1"
        assert f"{name}: iteration 2/2 in" in progress  # after one untimed warm-up iteration
        speed, epoch = float(row["it/s"]), float(row["s/epoch"])
        assert speed > 0
        # An epoch of 2 cases at batch size 1 is 2 iterations.
        assert epoch == pytest.approx(2 / speed, rel=0.01)
        assert float(row["cache_s"]) > 0
        assert 0 < float(row["cache_RAM_GB"]) <= float(row["peak_RAM_GB"])
        assert f"{name} on cpu: {row['it/s']} it/s, {row['s/epoch']} s per epoch of 2 cases" in output.splitlines()[-1]
    # Read from the configs as they are: the demo takes one crop per case, the default two.
    assert (rows["demo"]["crops/it"], rows["default"]["crops/it"]) == ("1", "2")


def test_benchmark_refuses_bad_options_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(configs="large", num_cases=1, iterations=0, overrides="num_workers")
    assert exit_info.value.code == 1
    errors = capsys.readouterr().err
    assert "--configs must be demo, default or both, not large" in errors
    assert "--num_cases must be at least 2, not 1" in errors
    assert "--iterations must be at least 1" in errors
    assert "--overrides must be a dict of config ids and values" in errors


def test_benchmark_says_when_the_dataset_has_too_few_cases(synthetic_dataset, capsys):
    with pytest.raises(SystemExit):
        main(configs="demo", num_cases=7, dataset_dir=str(synthetic_dataset))
    assert f"{synthetic_dataset} has 6 usable training cases, fewer than --num_cases 7" in capsys.readouterr().err
