"""End-to-end check that MONAI Label's stock ``monaibundle`` app serves this bundle (``make monailabel-check``).

In a temporary folder: the app as ``monailabel apps --download --name monaibundle`` gives it, this bundle copied into
its ``model/`` folder with small random weights (the demo's network settings, so that a CPU answers in seconds), one
synthetic case stacked by ``scripts.stack_modalities`` as the study. Then it starts ``monailabel start_server`` on
127.0.0.1 with the offline settings of docs/monailabel.md and checks, over HTTP as a viewer would:
``/info/`` names the label values as the label scheme does; ``POST /infer/<model>`` returns a label map on the
study's grid with values of the scheme; after ``models/model.pt`` is replaced, the next request uses the new weights.
The server is stopped at the end, whatever happens. Runs with the bundle's own environment; MONAI Label runs from
its own (``--monailabel``), which holds none of the bundle's other packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import requests
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR

from scripts.cases import MODALITIES
from scripts.labels import get_scheme
from scripts.metadata import config_label_scheme, label_channel_def
from scripts.synthetic import generate_dataset

BUNDLE_ROOT = Path(__file__).parents[1]
BUNDLE_NAME = "brats_peds_swin_unetr_segmentation"
BUNDLE_FILES = ("configs", "scripts", "docs", "LICENSE", "large_files.yml")
# A small network (the demo's feature size, at 2 mm): a few seconds per request on a CPU.
SMALL_NETWORK = {"spacing": [2.0, 2.0, 2.0], "roi_size": [64, 64, 64], "feature_size": 12, "sw_batch_size": 1}
CASE_SHAPE = (96, 96, 64)
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


class CheckError(Exception):
    """A check that did not hold."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckError(what)
    print(f"ok: {what}", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def install_bundle(model_dir: Path) -> Path:
    """This bundle in the app's model folder, its inference config set to the small network."""
    bundle = model_dir / BUNDLE_NAME
    bundle.mkdir(parents=True)
    for name in BUNDLE_FILES:
        source = BUNDLE_ROOT / name
        if source.is_dir():
            shutil.copytree(source, bundle / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, bundle / name)
    config_file = bundle / "configs" / "inference.yaml"
    config = ConfigParser.load_config_file(config_file)
    config.update(SMALL_NETWORK)
    ConfigParser.export_config_file(config, str(config_file), fmt="yaml", default_flow_style=None, sort_keys=False)
    return bundle


def random_state(out_channels: int, seed: int, output_bias: float | None = None) -> dict[str, torch.Tensor]:
    """Weights of the small Swin UNETR; `output_bias` sets every output logit's bias (e.g. +20: all regions)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = SwinUNETR(in_channels=len(MODALITIES), out_channels=out_channels, feature_size=12)
    state = network.state_dict()
    if output_bias is not None:
        state["out.conv.conv.bias"] = torch.full_like(state["out.conv.conv.bias"], output_bias)
    return state


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Replace the model file in one step, as a user copying new weights in would."""
    temporary = path.with_name(f".{path.name}.new")
    torch.save(state, temporary)
    os.replace(temporary, path)


def stack_synthetic_case(workdir: Path) -> tuple[Path, Path]:
    """(stacked study file, its t1c) of one synthetic case, stacked by the bundle's command."""
    dataset = generate_dataset(workdir / "dataset", num_train=0, num_val=1, seed=3, shape=CASE_SHAPE)
    studies = workdir / "studies"
    command = [sys.executable, "-m", "scripts.stack_modalities", "--dataset_dir", str(dataset["validation_dir"])]
    subprocess.run([*command, "--output_dir", str(studies)], cwd=BUNDLE_ROOT, check=True)
    (case_id,) = dataset["validation"]
    t1c = Path(dataset["validation_dir"]) / case_id / f"{case_id}-t1c.nii.gz"
    return studies / f"{case_id}.nii.gz", t1c


def wait_for_server(url: str, server: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise CheckError(f"the server exited with status {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return requests.get(f"{url}/info/", timeout=5).json()
        except requests.RequestException:
            time.sleep(2)
    raise CheckError(f"no answer from {url}/info/ within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def infer(url: str, study: Path, output: Path) -> np.ndarray:
    """POST /infer/<bundle> for the study; the returned label map, saved to `output` and loaded."""
    response = requests.post(
        f"{url}/infer/{BUNDLE_NAME}",
        params={"image": study.name.removesuffix(".nii.gz"), "output": "image"},
        data={"params": "{}"},
        timeout=REQUEST_TIMEOUT_S,
    )
    check(
        response.status_code == 200,
        f"POST /infer/{BUNDLE_NAME} answers 200 (got {response.status_code}: "
        f"{response.text[:500] if response.status_code != 200 else 'a label file'})",
    )
    output.write_bytes(response.content)
    return output


def assert_label_map_on_grid(result: Path, study: Path, t1c: Path, values: set[int]) -> np.ndarray:
    label, study_image, t1c_image = nib.load(result), nib.load(study), nib.load(t1c)
    data = np.asanyarray(label.dataobj)
    check(data.shape == study_image.shape[:3], f"the label map has the study's grid shape {study_image.shape[:3]}")
    check(np.allclose(label.affine, t1c_image.affine, atol=1e-4), "the label map has the t1c file's affine")
    found = set(np.unique(data).astype(int).tolist())
    check(found <= values, f"label values {sorted(found)} are values of the scheme {sorted(values)}")
    return data


def monailabel_environment(monailabel: str) -> dict[str, str]:
    """The environment of an activated MONAI Label venv: its `monailabel` command runs the first `python` on PATH."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(Path(monailabel).parent)
    environment.update(
        PATH=f"{venv_bin}{os.pathsep}{environment.get('PATH', '')}", VIRTUAL_ENV=str(Path(venv_bin).parent)
    )
    return environment


def run_checks(monailabel: str, workdir: Path) -> None:
    scheme = get_scheme(config_label_scheme())
    environment = monailabel_environment(monailabel)
    app = workdir / "apps" / "monaibundle"
    download = [monailabel, "apps", "--download", "--name", "monaibundle", "--output", str(app.parent)]
    subprocess.run(download, check=True, env=environment)
    check((app / "main.py").is_file(), f"stock monaibundle app in {app}")
    bundle = install_bundle(app / "model")
    model_file = bundle / "models" / "model.pt"
    model_file.parent.mkdir()
    save_weights(random_state(len(scheme.channels), seed=0), model_file)
    study, t1c = stack_synthetic_case(workdir)
    stacked = nib.load(study)
    check(stacked.shape == (*CASE_SHAPE, len(MODALITIES)), f"stacked study {study.name} of shape {stacked.shape}")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "server.log"
    command = [monailabel, "start_server", "--app", str(app), "--studies", str(study.parent)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--conf", "models", BUNDLE_NAME]
    command += ["--conf", "zoo_source", "github", "--conf", "sam2", "false", "--conf", "skip_trainers", "true"]
    print("starting:", " ".join(command), flush=True)
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    try:
        info = wait_for_server(url, server, log)
        labels = info["models"][BUNDLE_NAME]["labels"]
        expected = {name.lower(): int(value) for value, name in label_channel_def(scheme).items() if value != "0"}
        check(labels == expected, f"/info/ names the labels as {scheme.name} does: {labels}")

        first = assert_label_map_on_grid(infer(url, study, workdir / "first.nii.gz"), study, t1c, scheme.values)
        save_weights(random_state(len(scheme.channels), seed=0, output_bias=20.0), model_file)
        second = assert_label_map_on_grid(infer(url, study, workdir / "second.nii.gz"), study, t1c, scheme.values)
        # Every region everywhere gives the label painted last wherever the input is not 0 (a voxel at the brain's
        # edge may fall below 0.5 once the coarse prediction is resampled back).
        inside = np.asanyarray(stacked.dataobj).any(axis=-1)
        everything = scheme.paint_order[-1][1]
        covered = float(np.mean(second[inside] == everything))
        check(
            covered > 0.95 and not second[~inside].any() and set(np.unique(second)) <= {0, everything},
            f"after models/model.pt is replaced the next request uses it: label {everything} on "
            f"{covered:.1%} of the input, 0 elsewhere (first request: values {sorted(np.unique(first).tolist())})",
        )
    finally:
        stop(server)
        print("server stopped", flush=True)


def stop(server: subprocess.Popen) -> None:
    """End the server and the processes it started (its own process group), by its id."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def main(monailabel: str = ".venv-monailabel/bin/monailabel", workdir: str | None = None) -> None:
    """Run the checks with the MONAI Label command MONAILABEL in WORKDIR (default: a new temporary folder, removed
    when every check passed)."""
    folder = Path(workdir or tempfile.mkdtemp(prefix="monailabel_check_"))
    try:
        run_checks(str(Path(monailabel).absolute()), folder)
    except CheckError as failure:
        print(f"FAILED: {failure}\n(files and the server log kept in {folder})", file=sys.stderr)
        sys.exit(1)
    if workdir is None:
        shutil.rmtree(folder)
    print("MONAI Label check passed")


if __name__ == "__main__":
    fire.Fire(main)
