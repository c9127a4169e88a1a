"""Fixtures shared across stages: a small real data set, tokenizers, encoded rows, bundles."""

from pathlib import Path

import pytest

from parti_ops.model.config import Config

# Small enough for seconds per step on 2 cores, large enough to exercise every stage.
SMALL = {
    "data.image_size": 32,
    "image_tokenizer.channels": 8,
    "image_tokenizer.latent_dim": 16,
    "image_tokenizer.codebook_size": 64,
    "image_tokenizer.codebook_dim": 4,
    "image_tokenizer.batch_size": 8,
    "image_tokenizer.steps": 6,
    "image_tokenizer.warmup_steps": 2,
    "text_tokenizer.max_length": 24,
    "parti.d_model": 32,
    "parti.encoder_layers": 1,
    "parti.decoder_layers": 2,
    "train.steps": 6,
    "train.batch_size": 8,
    "train.warmup_steps": 2,
    "train.log_every": 1,
    "train.checkpoint_every": 3,
}


@pytest.fixture(scope="session", autouse=True)
def _no_outside_tracking_store():
    """Tests log to the store their config names, not to a developer's $MLFLOW_TRACKING_URI."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(autouse=True)
def _no_tracking_store_from_an_earlier_test(monkeypatch):
    # `mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI, which the config then prefers.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def small() -> dict:
    """The overrides of the small test configuration (a copy: tests may add to it)."""
    return dict(SMALL)


@pytest.fixture(scope="session")
def prepare():
    """`prepare(config, raw, root)`: ingest, validate, both tokenizers and encoding of the
    imagefolder `raw` into folders under `root`; returns their paths."""
    from parti_ops.components.encode import encode_step
    from parti_ops.components.ingest import ingest
    from parti_ops.components.tokenizers import image_tokenizer_step, text_tokenizer_step
    from parti_ops.components.validate import validate

    def run(config: Config, raw: Path, root: Path) -> dict[str, Path]:
        ingest(raw, root / "canonical", config.data)
        validate(root / "canonical", root / "validated", config.data)
        accepted = root / "validated" / "accepted"
        paths = {
            "accepted": accepted,
            "text": root / "text",
            "image": root / "image",
            "encoded": root / "encoded",
        }
        text_tokenizer_step(config, "", str(accepted), str(paths["text"]))
        image_tokenizer_step(config, "", str(accepted), str(paths["image"]))
        encode_step(
            config, "", str(accepted), str(paths["text"]), str(paths["image"]),
            str(paths["encoded"]),
        )  # fmt: skip
        return paths

    return run


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, prepare) -> dict[str, Path]:
    """Accepted data, both tokenizers and the encoded rows of a 100-image synthetic set."""
    from parti_ops.components.synth import synthesize

    root = tmp_path_factory.mktemp("parti")
    config = Config.load("tiny", overrides={**SMALL, "data.num_images": 100})
    synthesize(root / "raw", config.data)
    return prepare(config, root / "raw", root)


@pytest.fixture(scope="session")
def train_bundle(inputs):
    """`train_bundle(out, **overrides)`: run the training step on `inputs`; returns its report.

    MLflow runs go to `<out>.work/`.
    """
    from parti_ops.components.train_decoder import train_step

    def run(out: Path, **overrides) -> dict:
        work = out.with_name(out.name + ".work")
        config = Config.load("tiny", overrides={**SMALL, "work_dir": str(work), **overrides})
        return train_step(
            config, "", str(inputs["encoded"]), str(inputs["text"]),
            str(inputs["image"]), str(out),
        )  # fmt: skip

    return run
