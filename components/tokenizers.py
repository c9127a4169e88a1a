"""Pipeline steps that train the two tokenizers on the accepted data.

`text_tokenizer_step` trains the caption tokenizer on the training captions;
`image_tokenizer_step` trains the VQGAN on the training images and scores it on the
held-out split (the `test` split when there is one: colour–shape pairs never seen in
training). Each runs inside a nested MLflow run and writes its folder, which is what
`parti tokenizer encode` and the later steps load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parti_ops.components.loaders import heldout_split, iter_split, load_images
from parti_ops.components.shards import write_json
from parti_ops.components.versioning import files_digest
from parti_ops.model.config import Config
from parti_ops.model.errors import PartiError
from parti_ops.model.layout import IMAGE_TOKENIZER_FILES, TEXT_TOKENIZER_FILES

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class TokenizerError(PartiError, ValueError):
    """Data or settings a tokenizer cannot be trained on; the message says what to change."""


TEXT_REPORT = "training_report.json"
IMAGE_REPORT = "heldout_metrics.json"
GRID = "reconstructions.png"


def text_tokenizer_step(
    config: Config, parent_run_id: str, data_dir: str, out_dir: str
) -> dict[str, Any]:
    """Train the caption tokenizer on the `train` captions; save it and a report.

    The report counts captions longer than `text_tokenizer.max_length` (they are cut
    when encoded) and the share of `<unk>` tokens.
    """
    from parti_ops.components.tracking import step_run
    from parti_ops.model.text_tokenizer import UNK, encode_captions, train_text_tokenizer

    cfg = config.text_tokenizer
    out = Path(out_dir)
    with step_run(config, "text-tokenizer", parent_run_id) as run:
        captions = [
            caption or ""
            for table in iter_split(data_dir, "train", ["caption"])
            for caption in table["caption"].to_pylist()
        ]
        if not captions:
            raise TokenizerError(f"{data_dir}: no accepted rows in split 'train' to train on")
        tokenizer = train_text_tokenizer(captions, cfg)
        tokenizer.save_pretrained(out)
        ids, lengths, truncated = encode_captions(tokenizer, captions, cfg.max_length)
        unk = tokenizer.convert_tokens_to_ids(UNK)
        report = {
            "train_captions": len(captions),
            "vocab_size": len(tokenizer),
            "max_length": cfg.max_length,
            "truncated": truncated,
            "truncated_fraction": truncated / len(captions),
            "mean_tokens": float(lengths.mean()),
            "unk_fraction": float((ids == unk).sum() / lengths.sum()),
            "digest": files_digest(out, TEXT_TOKENIZER_FILES),
        }
        write_json(out / TEXT_REPORT, report)
        run.log(
            metrics={k: v for k, v in report.items() if k != "digest"},
            tags={"text_tokenizer.digest": report["digest"]},
        )
        run.log_artifact(out / TEXT_REPORT, "text_tokenizer")
    if truncated:
        log.warning(
            "%d of %d training captions are longer than text_tokenizer.max_length=%d"
            " tokens and will be cut",
            truncated,
            len(captions),
            cfg.max_length,
        )
    log.info("text tokenizer: %d tokens, saved to %s", report["vocab_size"], out)
    return report


def image_tokenizer_step(
    config: Config, parent_run_id: str, data_dir: str, out_dir: str, *, resume: bool = False
) -> dict[str, Any]:
    """Train the VQGAN on the `train` images, then score it on the held-out split.

    Writes the model (safetensors + config), `checkpoints/`, held-out metrics and a
    reconstruction grid (original | reconstruction) into `out_dir`.
    """
    from parti_ops.components.progress import progress_bar
    from parti_ops.components.tracking import step_run
    from parti_ops.model.vqgan_train import evaluate_vqgan, reconstruction_grid, train_vqgan

    cfg = config.image_tokenizer
    out = Path(out_dir)
    with step_run(config, "image-tokenizer", parent_run_id) as run:
        split = heldout_split(data_dir)
        heldout, scenes = load_images(data_dir, split)
        images, _ = load_images(data_dir, "train")
        if not len(images) or not len(heldout):
            raise TokenizerError(
                f"{data_dir}: the image tokenizer needs accepted rows in split 'train' (has"
                f" {len(images)}) and in 'test' or 'validation' to score it (has {len(heldout)})"
            )
        if images.shape[1:3] != (config.data.image_size,) * 2:
            raise TokenizerError(
                f"{data_dir}: images are {images.shape[1]}x{images.shape[2]}, the config says"
                f" data.image_size={config.data.image_size}; ingest with the same config"
            )
        log.info("training the image tokenizer on %d images, %d steps", len(images), cfg.steps)
        with progress_bar("image tokenizer") as update:
            model = train_vqgan(
                cfg,
                images,
                out,
                resume=resume,
                log_metrics=lambda metrics, step: run.log(metrics=metrics, step=step),
                progress=update,
            )
        metrics, recon = evaluate_vqgan(model, heldout, scenes, cfg.eval_batch_size)
        metrics = {"split": split, **metrics, "digest": files_digest(out, IMAGE_TOKENIZER_FILES)}
        write_json(out / IMAGE_REPORT, metrics)
        reconstruction_grid(heldout, recon).save(out / GRID)
        run.log(
            metrics={f"heldout/{k}": v for k, v in metrics.items() if isinstance(v, float)},
            tags={"image_tokenizer.digest": metrics["digest"], "heldout.split": split},
            step=cfg.steps,
        )
        run.log_artifact(out / IMAGE_REPORT, "image_tokenizer")
        run.log_artifact(out / GRID, "image_tokenizer")
    log.info(
        "image tokenizer on %s: PSNR %.2f dB, codebook usage %.1f%%, saved to %s",
        split,
        metrics["psnr"],
        100 * metrics["codebook_usage"],
        out,
    )
    return metrics
