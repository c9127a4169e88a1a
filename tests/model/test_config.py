import json

import pytest

from parti_ops.model.config import Config, ConfigError, DataConfig
from parti_ops.model.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    config = Config.from_name(name)
    assert config.name == name
    assert Config.from_json(config.to_json()) == config


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny.*small"):
        Config.from_name("huge")


def test_yaml_then_overrides_layer_over_the_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: small\ndata:\n  image_size: 32\n  seed: 7\n")
    config = Config.load("tiny", path, ["data.seed=9", "tracking.experiment=exp"])
    assert config.name == "small"
    assert config.data.image_size == 32  # from the file
    assert config.data.seed == 9  # the override wins over the file
    assert config.data.num_images == PRESETS["small"].data.num_images  # from the preset
    assert config.tracking.experiment == "exp"


def test_int_given_for_a_float_field_is_converted():
    config = Config.load("tiny", overrides={"data.max_quarantine_fraction": 0})
    assert config.data.max_quarantine_fraction == 0.0
    assert isinstance(config.data.max_quarantine_fraction, float)


def test_exponent_without_a_dot_reads_as_a_float(tmp_path):
    # YAML 1.1 reads 9e-3 as a string; a float field takes it as the number it spells.
    (tmp_path / "c.yaml").write_text("train:\n  lr: 9e-3\n")
    config = Config.load("tiny", tmp_path / "c.yaml", ["train.min_lr_ratio=5e-2"])
    assert (config.train.lr, config.train.min_lr_ratio) == (9e-3, 5e-2)
    for word in ("fast", "1e400"):  # not a number; not a finite one
        with pytest.raises(ConfigError, match=f"'train.lr': expected float, got '{word}'"):
            Config.load("tiny", overrides=[f"train.lr={word}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.imagesize=3", "unknown config key 'data.imagesize'.*image_size"),
        ("data.image_size=big", "'data.image_size': expected int"),
        ("data.image_size=4", "data.image_size=4: use 8..1024"),
        ("data=3", "is a section"),
        ("data.max_quarantine_fraction=2", r"fraction=2.0: use a number in \[0, 1\]"),
        ("nonsense", "use section.field=value"),
        ("data.image_size=30", "multiple of image_tokenizer.downsample=4"),
        ("image_tokenizer.downsample=3", "power of two"),
        ("image_tokenizer.codebook_size=70000", "codebook_size=70000"),
        ("image_tokenizer.codebook_dim=256", "codebook_dim=256: use 1..latent_dim"),
        ("image_tokenizer.architecture=unet", r"architecture='unet': use patch\|vit"),
        ("image_tokenizer.quantize_after=1", r"quantize_after=1.0: use a number in \[0, 1\)"),
        ("image_tokenizer.kmeans_images=0", "kmeans_images"),
        ("image_tokenizer.edge_weight=-1", "edge_weight"),
        ("image_tokenizer.refine_candidates=0", "refine_candidates=0: use >= 1"),
        ("image_tokenizer.refine_margin=-0.1", "refine_margin=-0.1: use >= 0"),
        ("image_tokenizer.keep_checkpoints=1", r"checkpoints=1: use >= 2 \(one to fall back on"),
        ("image_tokenizer.channels=14", "channels=14: use a multiple of 4"),
        ("text_tokenizer.vocab_size=100000", "vocab_size=100000"),
        ("text_tokenizer.kind=wordpiece", r"kind='wordpiece': use unigram\|bpe"),
        ("train.schedule=cosine", "train.schedule was removed; only 'wsd' is supported"),
        ("parti.activation=gelu", "parti.activation was removed; only 'relu2' is supported"),
        ("train.optimizer=adamw", "train.optimizer was removed; only 'muon' is supported"),
        ("image_tokenizer.ema_decay=0.9", "ema_decay was removed; only 0.0 is supported"),
        ("image_tokenizer.l1_weight=1", "l1_weight was removed; only 0.0 is supported"),
        ("train.grad_accum=3", r"batch_size=32 must be a multiple of .* \(3 \* 1 \* 1\)"),
        ("serve.http_port=70000", r"serve.http_port=70000: use 0..65535 \(0: a free port\)"),
        ("registry.max_fid_rise=.inf", "max_fid_rise=inf: use a finite number >= 0"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        Config.load("tiny", overrides=[override])


def test_a_removed_setting_loads_only_at_the_behaviour_that_survived():
    # A config written before the setting was removed (a pipeline spec's JSON, a YAML file).
    old = json.loads(PRESETS["tiny"].to_json())
    old["image_tokenizer"] |= {"rotation_trick": False, "l1_weight": 0.0, "ema_decay": 0.0}
    old["parti"] |= {"tie_head": True, "prompt_start": True, "qk_norm": True, "zero_init": True}
    old["parti"]["activation"] = "relu2"
    old["train"] |= {"optimizer": "muon", "schedule": "wsd"}
    assert Config.from_json(json.dumps(old)) == PRESETS["tiny"]
    # YAML reads `0` as an int: the float setting's surviving 0.0 all the same; True is not 1.
    zeros = ["image_tokenizer.l1_weight=0", "image_tokenizer.ema_decay=0"]
    assert Config.load("tiny", overrides=zeros) == PRESETS["tiny"]
    with pytest.raises(ConfigError, match="parti.tie_head was removed; only True is supported"):
        Config.load("tiny", overrides=["parti.tie_head=1"])
    with pytest.raises(ConfigError, match="parti.qk_norm was removed; only True is supported"):
        Config.load("tiny", overrides=["parti.qk_norm=false"])


def test_image_grid_follows_image_size_and_downsample():
    config = Config.load("tiny", overrides={"data.image_size": 32, "image_tokenizer.downsample": 8})
    assert config.image_grid == 4
    assert PRESETS["tiny"].image_grid == 16


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot read config YAML"):
        Config.load("tiny", path)


def test_flat_params_and_default_tracking_uri(tmp_path):
    config = Config.load("tiny", overrides={"work_dir": str(tmp_path)})
    flat = config.flat()
    assert flat["data.image_size"] == 64
    assert json.loads(config.to_json())["data"]["image_size"] == 64
    assert config.mlflow_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_sections_are_frozen():
    with pytest.raises(AttributeError):
        DataConfig().image_size = 3  # type: ignore[misc]
