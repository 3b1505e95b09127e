"""One 4-channel volume per BraTS case, for MONAI Label, whose datastore serves one image per case.

``python -m scripts.stack_modalities --dataset_dir DIR --output_dir STUDIES`` writes ``STUDIES/<case>.nii.gz`` for
every case folder of DIR (BraTS layout): the modalities as channels along the fourth axis in the network's order
t1c, t1n, t2f, t2w, on the t1c file's grid with its header (affine, qform and sform with their codes, units), so
that a label map made from it fits the t1c file. Every header is checked before anything is written; a case whose
voxels turn out unusable is reported and skipped; each file is written atomically; cases already stacked are
skipped unless ``--overwrite``. The bundle's inference reads both forms.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

from scripts.atomic import atomic_output, remove_stale_temporaries
from scripts.cases import case_files, channel_problems, check_case, survey_folders
from scripts.errors import InputError, exit_on_input_error


def stack_case(image_paths: list[str], output: str | Path) -> None:
    """Write the four modality files (in MODALITIES order) as one 4-channel NIfTI with the first one's header,
    atomically; InputError naming the file when a channel is empty or not finite."""
    reference = nib.load(image_paths[0])
    volumes = [np.asanyarray(nib.load(path).dataobj) for path in image_paths]
    stacked = np.stack(volumes, axis=-1).astype(np.result_type(*volumes), copy=False)
    problems = channel_problems(stacked)
    if problems:
        raise InputError([f"{image_paths[0]}: {problem}" for problem in problems])
    header = reference.header.copy()
    header.set_data_dtype(stacked.dtype)
    image = nib.Nifti1Image(stacked, reference.affine, header)
    image.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    image.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_output(output, suffix=".nii.gz") as temporary:
        nib.save(image, temporary)


def stack_dataset(dataset_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> dict:
    """Stack every case under `dataset_dir` into `output_dir`; returns {"written", "skipped_existing", "failed"}.

    InputError before anything is written when a case's files are missing, unreadable, truncated or on different
    grids (one line per file); after the run, when a case's voxels were unusable (those cases are not written)."""
    case_dirs, folder_problems = survey_folders(dataset_dir)
    if not case_dirs:
        raise InputError(
            [f"no cases in {dataset_dir}: expected <case>/<case>-t1c.nii.gz, -t1n, -t2f, -t2w", *folder_problems]
        )
    cases = [case_files(case_dir) for case_dir in case_dirs]
    problems = [line for case in cases for line in check_case({**case, "label": None}, check_data=False)]
    if problems:
        raise InputError(problems)
    output_dir = Path(output_dir)
    for path in remove_stale_temporaries(output_dir):
        print(f"removed {path.name}, left by an interrupted run", file=sys.stderr)
    failures, written = [], 0
    for case in cases:
        output = output_dir / f"{case['case']}.nii.gz"
        if output.exists() and not overwrite:
            continue
        try:
            stack_case(case["image"], output)
            written += 1
        except InputError as error:
            failures += [f"{case['case']}: {line}" for line in error.problems]
    skipped = len(cases) - written - len({line.split(": ", 1)[0] for line in failures})
    if failures:
        raise InputError([*failures, f"{written} written, {skipped} already present, the cases above left out"])
    return {"written": written, "skipped_existing": skipped, "failed": []}


def main(dataset_dir: str, output_dir: str, overwrite: bool = False) -> None:
    """Stack the four modalities of every case under DATASET_DIR into OUTPUT_DIR/<case>.nii.gz (channels t1c, t1n,
    t2f, t2w; the t1c header kept); cases already there are skipped unless --overwrite."""
    with exit_on_input_error():
        summary = stack_dataset(dataset_dir, output_dir, overwrite)
    print(f"{summary['written']} written, {summary['skipped_existing']} already present, in {output_dir}")


if __name__ == "__main__":
    fire.Fire(main)
