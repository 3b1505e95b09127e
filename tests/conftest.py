"""Shared pytest fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.networks.nets import SwinUNETR

from scripts.checkpoints import load_network_weights
from scripts.prepare_datalist import make_datalist, write_json_atomic
from scripts.synthetic import generate_dataset

SMALL_SHAPE = (64, 64, 40)
REPOSITORY = Path(__file__).parents[1]


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with 6 training + 2 validation synthetic BraTS-PED cases on a small grid, in the challenge
    layout; made once per session and shared, so tests must not modify it."""
    root = tmp_path_factory.mktemp("brats_ped")
    generate_dataset(root, num_train=6, num_val=2, seed=0, shape=SMALL_SHAPE)
    return root


# A tiny Swin UNETR on a coarse grid, so that one epoch on the small synthetic cases takes seconds.
TINY_TRAINING = {
    "spacing": [4.0, 4.0, 4.0],
    "roi_size": [64, 64, 64],
    # Evaluation's window would otherwise be inference's CPU default, sized for a full-size case.
    "val_roi_size": [64, 64, 64],
    "feature_size": 12,
    "use_checkpoint": False,
    "crops_per_case": 1,
    "num_workers": 0,
    "sw_batch_size": 1,
    "num_epochs": 1,
    "val_interval": 1,
    "warmup_epochs": 1,
}
TRAIN_CONFIG = str(Path(__file__).parents[1] / "configs" / "train.yaml")


@pytest.fixture(scope="session")
def synthetic_datalist(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-fold datalist of the synthetic dataset (4 training and 2 validation cases per fold)."""
    datalist, problems = make_datalist(synthetic_dataset, num_folds=3, seed=0)
    assert not problems
    path = tmp_path_factory.mktemp("datalist") / "datalist.json"
    write_json_atomic(datalist, path)
    return path


def train_workflow(dataset_dir: Path, datalist: Path, output_dir: Path, **overrides) -> ConfigWorkflow:
    """The training config as `monai.bundle run` would build it, with the tiny settings and `overrides`."""
    settings = {**TINY_TRAINING, "dataset_dir": str(dataset_dir), "datalist": str(datalist)}
    settings.update(output_dir=str(output_dir), **overrides)
    workflow = ConfigWorkflow(config_file=TRAIN_CONFIG, workflow_type="train", **settings)
    workflow.initialize()
    return workflow


@pytest.fixture(scope="session")
def trained_fold(synthetic_dataset: Path, synthetic_datalist: Path, tmp_path_factory: pytest.TempPathFactory):
    """One epoch of fold 0 on the synthetic cases: (finished workflow, its output folder)."""
    output_dir = tmp_path_factory.mktemp("fold0")
    workflow = train_workflow(synthetic_dataset, synthetic_datalist, output_dir, run_id="training")
    workflow.run()
    return workflow, output_dir


# Inference and export: the inference config with a tiny Swin UNETR (roi 64 is the smallest it takes).
INFERENCE_CONFIG = str(Path(__file__).parents[1] / "configs" / "inference.yaml")
METADATA = str(Path(__file__).parents[1] / "configs" / "metadata.json")
TINY_FEATURE_SIZE = 12


@pytest.fixture(scope="session")
def tiny_swin_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """State dict (best-model file format) of a seeded, untrained Swin UNETR as inference.yaml builds it
    with feature_size 12."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = SwinUNETR(in_channels=4, out_channels=3, feature_size=TINY_FEATURE_SIZE)
    path = tmp_path_factory.mktemp("tiny_swin") / "model.pt"
    torch.save(network.state_dict(), path)
    return path


# One sliding window of sw_batch_size 1 at the tiny roi: exported models have fixed shapes.
EXPORT_INPUT_SHAPE = [1, 4, 64, 64, 64]
EXPORT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="session")
def export_reference(tiny_swin_checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the PyTorch network that inference.yaml defines, with the tiny checkpoint."""
    parser = ConfigParser()
    parser.read_config(INFERENCE_CONFIG)
    parser["feature_size"] = TINY_FEATURE_SIZE
    network = load_network_weights(parser.get_parsed_content("network_def"), tiny_swin_checkpoint).eval()
    image = torch.rand(EXPORT_INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return image, network(image)


def process_tree(pid: int) -> list[int]:
    """`pid` and its living descendants (Linux /proc): torchrun starts each worker in a session of its own, so a
    process group does not hold them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, queue = [], [pid]
    while queue:
        tree.append(queue.pop())
        queue += children.get(tree[-1], [])
    return tree


def kill_while_writing(
    command: list[str], folder: Path, final_name: str, timeout: float = 240.0, with_children: bool = False
) -> str:
    """Start `command`, SIGKILL it while it writes a temporary of a file named like `final_name` (a glob) in
    `folder`, and return the name of the file it was writing. `with_children`: freeze and kill its descendants
    too (torchrun's workers), as a job scheduler or a node failure would."""
    process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def send(signal_number: int) -> None:
        for pid in process_tree(process.pid) if with_children else [process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            writing = [path for path in folder.glob(f".{final_name}.partial.*")] if folder.is_dir() else []
            if writing:
                send(signal.SIGSTOP)  # freeze it, then make sure the write is still under way
                if writing[0].exists():
                    send(signal.SIGKILL)
                    process.wait()
                    return writing[0].name.split(".partial.")[0][1:]
                send(signal.SIGCONT)
            time.sleep(0.0005)
    finally:
        if process.poll() is None:
            send(signal.SIGKILL)
            process.wait()
    raise AssertionError(f"{command} never wrote {final_name} in {folder} (exit status {process.returncode})")


def leave_a_temporary(path: Path) -> Path:
    """What a process killed while writing `path` atomically leaves behind: run one that SIGKILLs itself mid-write,
    and return the temporary."""
    code = (
        "import os, signal\n"
        "from scripts.atomic import atomic_output\n"
        f"with atomic_output({str(path)!r}, suffix='.nii.gz') as temporary:\n"
        "    temporary.write_bytes(b'half a file')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY).returncode == -signal.SIGKILL
    (temporary,) = path.parent.glob(f".{path.name}.partial.*")
    return temporary
