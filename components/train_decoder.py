"""The decoder training step: Parti on the encoded data, in one process or under torchrun.

Its output folder is a self-contained bundle that `parti generate` (and later the
registry and the export) read: `parti/` (safetensors + config), copies of the
`text_tokenizer/` and `image_tokenizer/` the data was encoded with, `checkpoints/`,
`training_report.json` and `samples.png` (held-out prompts: sample | reference).

With `train.nproc` > 1 the step starts `torchrun` on this module; every process runs
`fit`, and rank 0 alone logs to MLflow and writes the bundle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from parti_ops.components.loaders import EncodedFormatError, load_encoded, read_encoded_manifest
from parti_ops.components.shards import HELDOUT_SPLITS, write_json
from parti_ops.components.versioning import files_digest
from parti_ops.model.config import Config
from parti_ops.model.errors import PartiError
from parti_ops.model.layout import (
    IMAGE_TOKENIZER_FILES,
    PREEMPTED,
    PREEMPTED_EXIT_CODE,
    SAMPLES,
    TEXT_TOKENIZER_FILES,
    TRAIN_ENTRY,
)
from parti_ops.model.layout import TRAINING_REPORT as REPORT

log = logging.getLogger(__name__)


class TrainError(PartiError, ValueError):
    """Inputs the training step cannot use; the message says which and what to do."""


def train_step(
    config: Config,
    parent_run_id: str,
    encoded_dir: str,
    text_dir: str,
    image_dir: str,
    out_dir: str,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Train the decoder on the `train` split; report held-out NLL; write the bundle.

    Returns the training report (also `out_dir/training_report.json`).
    """
    if config.train.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(config, parent_run_id, encoded_dir, text_dir, image_dir, out_dir, resume)
    manifest = _check_inputs(encoded_dir, text_dir, image_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    runs = _tracking(config, parent_run_id) if rank0 else contextlib.nullcontext(None)
    with runs as run:
        return _train(
            config, manifest, encoded_dir, text_dir, image_dir, Path(out_dir), resume, run
        )


def _train(config, manifest, encoded_dir, text_dir, image_dir, out: Path, resume, run) -> dict:
    import torch

    from parti_ops.components.progress import progress_bar
    from parti_ops.model.parti import PartiDims
    from parti_ops.model.train import CodeData, fit, heldout_nll

    dims = PartiDims.from_manifest(manifest)
    data = CodeData.from_arrays(load_encoded(encoded_dir, "train"), dims.text_length)
    if not len(data):
        raise TrainError(f"{encoded_dir}: no rows in split 'train'; encode the data first")
    history: list[dict[str, float]] = []

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        history.append({"step": step, **metrics})
        if run is not None:
            run.log(metrics={f"train/{k}": v for k, v in metrics.items()}, step=step)

    if run is not None:
        run.log(params=config.flat())
    log.info("training Parti on %d rows for %d steps", len(data), config.train.steps)
    started = time.perf_counter()
    with progress_bar("decoder") if run is not None else contextlib.nullcontext(None) as update:
        model = fit(
            config.parti,
            config.train,
            dims,
            data,
            out,
            resume=resume,
            log_metrics=log_metrics,
            progress=update,
        )
    if run is None:  # not rank 0: the bundle and the report are rank 0's
        return {}
    _copy_tokenizers(text_dir, image_dir, out)
    model = model.to("cpu") if torch.cuda.is_available() else model
    report: dict[str, Any] = {
        "steps": config.train.steps,
        "parameters": model.num_parameters(),
        "train_rows": len(data),
        # Wall time of fit(): this run's steps (after a resume, only those since).
        "train_seconds": round(time.perf_counter() - started, 1),
        "history": history,
    }
    heldout = data  # the sample grid's captions: the last held-out split, else training
    for split in HELDOUT_SPLITS:
        if split in manifest["splits"]:
            heldout = CodeData.from_arrays(load_encoded(encoded_dir, split), dims.text_length)
            report[f"{split}_bits_per_token"] = heldout_nll(model, heldout)
    _sample_grid(config, out, heldout)
    write_json(out / REPORT, report)
    run.log(
        metrics={k: v for k, v in report.items() if isinstance(v, int | float)},
        tags={"data_digest": manifest.get("data_digest") or "", "preset": config.name},
        step=config.train.steps,
    )
    run.log_artifact(out / REPORT, "parti")
    run.log_artifact(out / SAMPLES, "parti")
    return report


@contextlib.contextmanager
def _tracking(config, parent_run_id: str):
    from parti_ops.components.tracking import step_run

    with step_run(config, "train", parent_run_id) as run:
        yield run


def _check_inputs(encoded_dir: str, text_dir: str, image_dir: str) -> dict[str, Any]:
    """The encoded manifest, after checking it was made by these tokenizers."""
    manifest = read_encoded_manifest(encoded_dir)
    for key, folder, files in (
        ("text_tokenizer", text_dir, TEXT_TOKENIZER_FILES),
        ("image_tokenizer", image_dir, IMAGE_TOKENIZER_FILES),
    ):
        try:
            digest = files_digest(folder, files)
        except OSError as err:
            raise TrainError(f"{folder}: cannot read the {key.replace('_', ' ')} ({err})") from None
        if manifest.get(key, {}).get("digest") != digest:
            raise TrainError(
                f"{encoded_dir} was encoded with another {key.replace('_', ' ')} than {folder};"
                " re-encode with this one, or pass the one it was made with"
            )
    return manifest


def _copy_tokenizers(text_dir: str, image_dir: str, out: Path) -> None:
    from parti_ops.model.layout import IMAGE_TOKENIZER, TEXT_TOKENIZER

    for folder, files, name in (
        (text_dir, TEXT_TOKENIZER_FILES, TEXT_TOKENIZER),
        (image_dir, IMAGE_TOKENIZER_FILES, IMAGE_TOKENIZER),
    ):
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        names = files if name == IMAGE_TOKENIZER else [p.name for p in Path(folder).iterdir()]
        for file in names:
            if (Path(folder) / file).is_file():
                shutil.copy2(Path(folder) / file, target / file)


def _sample_grid(config, out: Path, data, rows: int = 8) -> None:
    """Samples for the first captions of `data` beside their reference images' reconstructions."""
    import torch

    from parti_ops.model.generate import TextToImage
    from parti_ops.model.sampling import generate_codes
    from parti_ops.model.vqgan import to_uint8
    from parti_ops.model.vqgan_train import reconstruction_grid

    bundle = TextToImage.load(out)  # from the bundle's files, which this also checks
    index = torch.arange(min(rows, len(data)))
    text_ids, text_mask, codes = data.rows(index, torch.device("cpu"))
    s = config.sample
    sampled = generate_codes(
        bundle.parti,
        text_ids,
        text_mask,
        [s.seed + i for i in range(len(index))],
        guidance_scale=s.guidance_scale,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
    )
    grid = bundle.parti.dims.grid
    with torch.inference_mode():
        reference = to_uint8(bundle.vqgan.decode_codes(codes.view(-1, grid, grid)))
        samples = to_uint8(bundle.vqgan.decode_codes(sampled))
    reconstruction_grid(samples, reference, pairs=rows).save(out / SAMPLES)


def _launch(config, parent_run_id, encoded_dir, text_dir, image_dir, out_dir, resume):
    """Run this step under `torchrun` with `train.nproc` processes; rank 0 writes the report."""
    from parti_ops.deploy.torchrun import launch

    nproc = config.train.nproc
    out = Path(out_dir)
    arguments = {  # JSON in the launch file: each process parses the config once (`main`)
        "config_json": config.to_json(),
        "parent_run_id": parent_run_id,
        "encoded_dir": encoded_dir,
        "text_dir": text_dir,
        "image_dir": image_dir,
        "out_dir": out_dir,
        "resume": resume,
    }
    log.info("starting %d training processes (torchrun)", nproc)
    code = launch(TRAIN_ENTRY, arguments, out / "launch.json", out, nproc=nproc)
    if code == PREEMPTED_EXIT_CODE:
        raise SystemExit(PREEMPTED_EXIT_CODE)
    if code:
        raise TrainError(f"torchrun exited with code {code}; its processes' errors are above")
    return json.loads((out / REPORT).read_text(encoding="utf-8"))


def main(argv: list[str]) -> None:
    """Entry point of each torchrun process (`TRAIN_ENTRY`), given the launch.json path."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from parti_ops.model.checkpoint import CheckpointError

    kwargs = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    resume = kwargs.pop("resume")
    config = Config.from_json(kwargs.pop("config_json"))
    try:
        train_step(config, **kwargs, resume=resume)
    except (TrainError, EncodedFormatError, CheckpointError) as err:
        raise SystemExit(f"train: {err}") from None
    except SystemExit as stop:
        if stop.code == PREEMPTED_EXIT_CODE and os.environ.get("RANK") == "0":
            (Path(kwargs["out_dir"]) / PREEMPTED).write_text("preempted: resume from checkpoints\n")
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
