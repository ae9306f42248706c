"""The settings schema: built from app/defaults.yaml (a new key is checked by its default's type), strict
types, choices and bounds, did-you-mean for unknown keys, one-line errors; the settings the backbone
decides; what --resume compares."""
from typing import get_args

import pytest
import yaml

from app import config
from app.backbone import check_settings
from app.config import ConfigError, differences, flat, load_config, shaping, validate
from tests.fixtures import TINY

SCALAR_TYPES = (bool, int, float, str, type(None))


def test_every_rule_names_a_default_and_the_defaults_pass():
    defaults = flat(config.defaults())
    assert set(config.RULES) <= set(defaults), set(config.RULES) - set(defaults)
    assert all(isinstance(v, (*SCALAR_TYPES, list)) for v in defaults.values())
    assert validate(config.defaults())
    for run_only in config.RUN_ONLY:               # no stale name in the keys --resume may change
        assert any(k == run_only or k.startswith(run_only + ".") for k in defaults), run_only


def test_the_profile_and_the_command_line_choices_come_from_the_schema():
    cfg = load_config("configs/proxy-cpu.yaml")
    assert cfg["input"]["image_size"] != 448
    from app.__main__ import parser
    args = parser().parse_args(["infer", "T", "O", "--tta", "flip", "--precision", "no"])
    assert args.tta == "flip" and args.precision == "no"
    assert get_args(config.RULES["infer.tta"]) == ("none", "flip", "multiscale")


@pytest.mark.parametrize("item, says", [
    ("finetune.epochs=two", 'finetune.epochs="two": expected a valid integer (default 10'),
    ("finetune.epochs=2.5", "finetune.epochs=2.5: expected a valid integer"),
    ("finetune.epochs=-1", "finetune.epochs=-1: expected greater than or equal to 1"),
    ("finetune.epochs=0", "finetune.epochs=0: expected greater than or equal to 1"),
    ("noise.enabled=flase", 'noise.enabled="flase": expected true or false (default true'),
    ("noise.enabled=no", 'noise.enabled="no": expected true or false'),
    ("noise.enabled=1", "noise.enabled=1: expected true or false"),
    ("finetune.lr=0", "finetune.lr=0: expected greater than 0"),
    ("finetune.batch_size=0", "finetune.batch_size=0: expected greater than or equal to 1"),
    ("finetune.tune=ful", "finetune.tune=\"ful\": expected 'lora', 'full' or 'none'"),
    ("finetune.loss=sce", "expected 'ce' or 'gce'"),
    ("infer.tta=flips", "expected 'none', 'flip' or 'multiscale'"),
    ("precision=fp8", "expected 'auto', 'bf16', 'fp16' or 'no'"),
    ("noise.probe=knn", "expected 'lda' or 'logistic'"),
    ("noise.weight_mode=medium", "expected 'soft' or 'hard'"),
    ("num_workers=-1", "num_workers=-1: expected 'auto' or greater than or equal to 0"),
    ("input.image_size=natve", "expected 'native' or a valid integer"),
    ("lora.last_blocks=0", "expected 'all' or greater than or equal to 1"),
    ("lora.targets=q", 'lora.targets="q": expected a valid list'),
    ("lora.targets=[q, qkv]", "expected item 2: 'q', 'k', 'v', 'out', 'fc' or 'proj'"),
    ("finetune.crop_scale=[0.6]", "List should have at least 2 items"),
    ("finetune.crop_scale=[0.9, 0.6]", "expected [low, high] with low <= high"),
    ("backbone.weights=[a]", "backbone.weights=[\"a\"]: expected a valid string"),
    ("validation.max_fraction=1.5", "expected less than or equal to 1"),
    ("finetune.tune=full", "add --set finetune.reg_lambda=0"),
    ("finetune=3", "'finetune' is a section of settings, not one"),
    ("finetune.epochs", "--set expects section.key=value"),
    ("finetune.epochs=[1", "--set finetune.epochs=[1 is not valid YAML"),
])
def test_a_wrong_value_is_one_line_naming_key_value_and_expectation(item, says):
    with pytest.raises(ConfigError) as e:
        load_config(sets=[item])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_numbers_booleans_and_words_as_yaml_1_2_reads_them():
    cfg = load_config(sets=["finetune.lr=1e-3", "precision=no", "noise.enabled=false", "lora.last_blocks=4",
                            "num_workers=auto", "finetune.head_lr=1", "lora.targets=[q, v]", "noise.verbose=True"])
    assert cfg["finetune"]["lr"] == 0.001 and cfg["precision"] == "no" and cfg["noise"]["enabled"] is False
    assert cfg["lora"]["last_blocks"] == 4 and cfg["num_workers"] == "auto" and cfg["finetune"]["head_lr"] == 1
    assert cfg["lora"]["targets"] == ["q", "v"] and cfg["noise"]["verbose"] is True
    # the command line's typed options are taken as given, and checked all the same
    assert load_config(overrides={"precision": "no"})["precision"] == "no"
    with pytest.raises(ConfigError, match="finetune.epochs=-1"):
        load_config(overrides={"finetune.epochs": -1})


@pytest.mark.parametrize("key, near", [("finetune.epoch", "finetune.epochs"), ("epochs", "warmup.epochs or finetune.epochs"),
                                       ("lora.rnak", "lora.rank"), ("noise.enable", "noise.enabled")])
def test_unknown_keys_get_a_did_you_mean(key, near, tmp_path):
    with pytest.raises(ConfigError, match=f"unknown setting '{key}' \\(did you mean {near}\\?\\)"):
        load_config(sets=[f"{key}=3"])
    section, _, leaf = key.rpartition(".")          # the same in a --config file
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({section: {leaf: 3}} if section else {leaf: 3}))
    with pytest.raises(ConfigError, match=f"did you mean {near}"):
        load_config(str(user))


def test_a_config_file_is_checked_like_the_command_line(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("noise:\n  enabled: no\n")
    with pytest.raises(ConfigError, match='noise.enabled="no": expected true or false'):
        load_config(str(user))
    user.write_text("finetune: [1, 2]\n")
    with pytest.raises(ConfigError, match="'finetune' is a section of settings"):
        load_config(str(user))
    user.write_text("finetune:\n  epochs: 3\n   lr: 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(user))
    with pytest.raises(ConfigError, match=f"--config {tmp_path / 'nope.yaml'}: file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_a_new_default_is_checked_by_its_type_without_new_code(tmp_path, monkeypatch):
    text = config.DEFAULTS_FILE.read_text().replace("  hflip: true\n", "  hflip: true\n  jitter: 0.25\n"
                                                                        "  shuffle: true\n")
    assert "jitter" in text
    monkeypatch.setattr(config, "DEFAULTS_FILE", tmp_path / "defaults.yaml")
    config.DEFAULTS_FILE.write_text(text)
    assert load_config(sets=["finetune.jitter=0.5"])["finetune"]["jitter"] == 0.5
    with pytest.raises(ConfigError, match='finetune.jitter="strong": expected a valid number'):
        load_config(sets=["finetune.jitter=strong"])
    with pytest.raises(ConfigError, match='finetune.shuffle="yes": expected true or false'):
        load_config(sets=["finetune.shuffle=yes"])


def test_the_backbone_decides_the_patch_multiple_and_the_blocks():
    tiny = dict(TINY, act="gelu")                  # patch 8, 32 px, 2 blocks
    check_settings(tiny, load_config(sets=["input.image_size=64", "lora.last_blocks=2"]))
    check_settings(tiny, load_config(sets=["input.image_size=native", "features.image_size=40"]))
    with pytest.raises(ConfigError, match=r"input.image_size=100 is not a multiple of the backbone's patch "
                                          r"\(8 px\): use 96 or 104, or native \(32 px\)"):
        check_settings(tiny, load_config(overrides={"input.image_size": 100}))
    with pytest.raises(ConfigError, match="features.image_size=36"):
        check_settings(tiny, load_config(sets=["features.image_size=36"]))
    with pytest.raises(ConfigError, match="lora.last_blocks=3: the backbone has 2 blocks"):
        check_settings(tiny, load_config(sets=["lora.last_blocks=3"]))


def test_resume_compares_the_settings_that_shape_the_model_and_data_only():
    base = load_config()
    same = load_config(sets=["num_workers=0", "precision=no", "features.batch_size=8", "infer.tta=flip",
                             "backbone.weights=x.pt", "finetune.max_device_batch=4"])
    assert differences(shaping(base), shaping(same)) == []
    other = load_config(sets=["lora.rank=8", "finetune.epochs=4", "noise.enabled=false", "validation.per_class=1"])
    assert differences(shaping(base), shaping(other)) == [
        "finetune.epochs 10 -> 4", "lora.rank 32 -> 8", "noise.enabled true -> false", "validation.per_class 3 -> 1"]
    assert config.changed(other) == {"lora.rank": 8, "finetune.epochs": 4, "noise.enabled": False,
                                     "validation.per_class": 1}


def test_a_submission_file_is_applied_under_config_and_set(tmp_path, monkeypatch):
    """configs/submission.yaml (a team's chosen settings) reaches the organisers' plain command:
    defaults < submission < --config < --set; a mistake in it is one line naming the file."""
    submission = tmp_path / "submission.yaml"
    submission.write_text("finetune:\n  lr: 0.0005\n  epochs: 4\n")
    monkeypatch.setattr(config, "SUBMISSION_FILE", submission)
    cfg = load_config()
    assert (cfg["finetune"]["lr"], cfg["finetune"]["epochs"]) == (0.0005, 4)
    user = tmp_path / "user.yaml"
    user.write_text("finetune:\n  epochs: 6\n")
    cfg = load_config(str(user), sets=["finetune.lr=0.001"])
    assert (cfg["finetune"]["lr"], cfg["finetune"]["epochs"]) == (0.001, 6)
    submission.write_text("finetune:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="finetune.lr"):
        load_config()
    monkeypatch.setattr(config, "SUBMISSION_FILE", tmp_path / "absent.yaml")
    assert load_config()["finetune"]["lr"] == config.defaults()["finetune"]["lr"]
