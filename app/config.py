"""One config: app/defaults.yaml, optionally a user file on top, then command-line overrides, checked
as a whole before any work.

The check is a typed schema built from app/defaults.yaml itself (pydantic, strict): every value must
have its default's type (a number where the default is a number, true/false where it is a boolean, a
list where it is a list), and the keys in RULES take a narrower or wider set (choices, bounds, a word
beside a number). A key added to defaults.yaml is checked by its default's type without new code.
Every mistake is one ConfigError line naming the key, the value, what is expected and the default;
an unknown key gets a did-you-mean.

YAML is read with the 1.2 core schema's scalars: only true/false are booleans (`precision: no` is the
mode "no", `noise.enabled=no` a mistake) and 1e-3 is a number.
"""
import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, create_model

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
REPO = DEFAULTS_FILE.parent.parent
# A team's chosen settings (e.g. a sweep's best.yaml copied here), applied by every command on top of
# defaults.yaml and under --config / --set: the organisers' plain `run_train.sh /data/train` then
# trains the chosen model. Absent from the repository as published.
SUBMISSION_FILE = REPO / "configs" / "submission.yaml"


class ConfigError(ValueError):
    """A settings mistake: the run stops with this one line before any work (exit code 1)."""


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans (true/false only) and floats (1e-3 included)."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
Yaml12Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
                       r"|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))


def read_yaml(text: str, where: str):
    try:
        return yaml.load(text, Loader=Yaml12Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None


# Value sets narrower or wider than "a value of the default's type", by dotted key.
Count = Annotated[int, Field(ge=1)]            # at least one
Whole = Annotated[int, Field(ge=0)]            # zero or more
Rate = Annotated[float, Field(gt=0)]           # a step size, a scale: above zero
Amount = Annotated[float, Field(ge=0)]         # zero (off) or more
Share = Annotated[float, Field(ge=0, le=1)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Size = Literal["native"] | Annotated[int, Field(ge=1)]    # px; a multiple of the patch: app/backbone.py
MaybePath = str | None                          # a file or folder, or null
RULES = {
    "seed": Whole,
    "precision": Literal["auto", "bf16", "fp16", "no"],
    "num_workers": Literal["auto"] | Whole,
    "process_group_timeout_min": Rate,
    "main_process_wait_min": Rate,
    "shared_dir": MaybePath,
    "backbone.weights": MaybePath,
    "input.image_size": Size,
    "features.image_size": Size,
    "features.batch_size": Count,
    "features.cache_dir": MaybePath,
    "warmup.epochs": Whole,                    # 0: the head starts at zero (bench arm recipe-no_warmup)
    "warmup.batch_size": Count,
    "warmup.lr": Rate,
    "warmup.weight_decay": Amount,
    "lora.rank": Count,
    "lora.alpha": Rate,
    "lora.last_blocks": Literal["all"] | Count,
    "lora.targets": Annotated[list[Literal["q", "k", "v", "out", "fc", "proj"]], Field(min_length=1)],
    "finetune.tune": Literal["lora", "full", "none"],
    "finetune.epochs": Count,
    "finetune.batch_size": Count,
    "finetune.max_device_batch": Count,
    "finetune.lr": Rate,
    "finetune.head_lr": Rate,
    "finetune.weight_decay": Amount,
    "finetune.warmup_frac": Fraction,
    "finetune.grad_clip": Amount,
    "finetune.loss": Literal["ce", "gce"],
    "finetune.label_smoothing": Fraction,
    "finetune.gce_q": Annotated[float, Field(gt=0, le=1)],
    "finetune.mixup_alpha": Amount,
    "finetune.reg_lambda": Amount,
    "finetune.ema_decay": Fraction,
    "finetune.crop_scale": Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=2, max_length=2)],
    "infer.batch_size": Count,
    "infer.tau": Amount,
    "infer.tta": Literal["none", "flip", "multiscale"],
    "infer.tta_scales": Annotated[list[Rate], Field(min_length=1)],
    "noise.max_drop_fraction": Share,
    "noise.folds": Annotated[int, Field(ge=2)],
    "noise.rounds": Count,
    "noise.probe": Literal["lda", "logistic"],
    "noise.weight_mode": Literal["soft", "hard"],
    "validation.per_class": Whole,
    "validation.max_class_share": Share,
    "validation.max_fraction": Share,
    "validation.warn_half_width": Annotated[float, Field(gt=0, le=1)],
}

# Settings that change how fast a run goes or where it writes, not the model it trains nor the data it
# trains on: the only ones a --resume may change (every other key, a new one included, must match).
RUN_ONLY = ("precision", "num_workers", "process_group_timeout_min", "main_process_wait_min", "shared_dir",
            "backbone.weights", "backbone.allow_nonstandard", "features.batch_size", "features.cache_dir",
            "finetune.max_device_batch", "infer", "noise.threads", "noise.verbose")


def _default_type(value):
    if value is None:
        return str | None
    if isinstance(value, list):
        return list[_default_type(value[0])] if value else list
    return float if isinstance(value, float) else type(value)


def _schema(node: dict, where: str = ""):
    fields = {}
    for key, value in node.items():
        dotted = f"{where}{key}"
        annotation = (_schema(value, dotted + ".") if isinstance(value, dict)
                      else RULES.get(dotted, _default_type(value)))
        fields[key] = (annotation, ...)
    return create_model(f"Settings_{where.strip('.') or 'root'}",
                        __config__=ConfigDict(strict=True, extra="forbid"), **fields)


def defaults() -> dict:
    return read_yaml(DEFAULTS_FILE.read_text(), str(DEFAULTS_FILE))


def flat(cfg: dict, where: str = "") -> dict:
    """{'a.b': value} for every leaf of a nested config."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{where}{key}."))
        else:
            out[f"{where}{key}"] = value
    return out


def _sections(cfg: dict, where: str = "") -> list[str]:
    return [f"{where}{k}" for k, v in cfg.items() if isinstance(v, dict)] + \
        [s for k, v in cfg.items() if isinstance(v, dict) for s in _sections(v, f"{where}{k}.")]


def unknown_key(dotted: str) -> ConfigError:
    """An unknown key, with the nearest known ones (by spelling, or by the last part of the name)."""
    base = defaults()
    known = list(flat(base)) + _sections(base)
    leaf = dotted.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
    near += [k for k in known if k.rsplit(".", 1)[-1] == leaf and k not in near]
    hint = f" (did you mean {' or '.join(near[:3])}?)" if near else ""
    return ConfigError(f"unknown setting '{dotted}'{hint}; every setting is in {DEFAULTS_FILE}")


def _describe(errors: list[dict]) -> str:
    """What pydantic expected, in its words, once: "'auto' or greater than or equal to 0"."""
    wanted = []
    for e in errors:
        text = "true or false" if e["type"] == "bool_type" else e["msg"].removeprefix("Input should be ")
        item = [p for p in e["loc"][1:] if isinstance(p, int)]
        text = f"item {item[0] + 1}: {text}" if item else text
        if text not in wanted:
            wanted.append(text)
    return " or ".join(wanted)


def _json(value) -> str:
    return json.dumps(value, default=str)


def validate(cfg: dict) -> dict:
    """`cfg` itself when every value is allowed; else a ConfigError naming the first key that is not,
    its value, what it takes and its default. Callable on any resolved config (e.g. a sweep's)."""
    try:
        _schema(defaults()).model_validate(cfg)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        node, parts = cfg, []
        for part in first["loc"]:
            if not (isinstance(node, dict) and part in node):
                break
            node, parts = node[part], parts + [part]
        key = ".".join(map(str, parts))
        if first["type"] == "extra_forbidden":
            raise unknown_key(key) from None
        if first["type"] == "missing":
            missing = ".".join(map(str, first["loc"][:len(parts) + 1]))
            raise ConfigError(f"setting '{missing}' is missing (see app/defaults.yaml)") from None
        same = [x for x in errors if x["loc"][:len(parts)] == first["loc"][:len(parts)]]
        default = flat(defaults()).get(key)
        raise ConfigError(f"{key}={_json(node)}: expected {_describe(same)} "
                          f"(default {_json(default)}, app/defaults.yaml)") from None
    fcfg = cfg["finetune"]
    if fcfg["tune"] == "full" and fcfg["reg_lambda"]:
        raise ConfigError("finetune.tune=full with finetune.reg_lambda="
                          f"{fcfg['reg_lambda']}: the pull toward the pretrained weights is for LoRA; "
                          "add --set finetune.reg_lambda=0")
    if fcfg["crop_scale"][0] > fcfg["crop_scale"][1]:
        raise ConfigError(f"finetune.crop_scale={fcfg['crop_scale']}: expected [low, high] with low <= high")
    return cfg


def set_key(cfg: dict, dotted: str, value, parse: bool = True) -> None:
    """Set cfg['a']['b'] from 'a.b'; with `parse`, a string value is read as YAML 1.2 (numbers, lists,
    null, true/false)."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise unknown_key(dotted)
        node = node[p]
    if leaf not in node:
        raise unknown_key(dotted)
    if isinstance(node[leaf], dict):
        raise ConfigError(f"'{dotted}' is a section of settings, not one: name a key in it, e.g. "
                          f"{dotted}.{next(iter(node[leaf]))}=...")
    if parse and isinstance(value, str):
        value = read_yaml(value, f"--set {dotted}={value}")
    node[leaf] = value


def _merge(base: dict, update: dict, where: str = "") -> dict:
    for key, value in update.items():
        if key not in base:
            raise unknown_key(f"{where}{key}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}{key}' is a section of settings, not a value: write its keys "
                                  f"below it (see {DEFAULTS_FILE})")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value
    return base


def config_file(name) -> Path:
    """A --config FILE: as given (relative to the current folder), else relative to the repository
    (`--config configs/proxy-cpu.yaml` from any folder)."""
    path = Path(name)
    for candidate in (path, REPO / path) if not path.is_absolute() else (path,):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"--config {name}: file not found (looked in {Path.cwd()}"
                      f"{'' if path.is_absolute() else f' and in {REPO}'})")


def load_config(user_file: str | None = None, overrides: dict | None = None,
                sets: list[str] | None = None) -> dict:
    """defaults.yaml < configs/submission.yaml (when present) < user_file < `--set a.b=v` strings < explicit overrides (dotted keys, values as
    given: typed by the command line's options, never re-read as YAML); checked (validate)."""
    cfg = defaults()
    for path in ([SUBMISSION_FILE] if SUBMISSION_FILE.is_file() else []) + \
            ([config_file(user_file)] if user_file else []):
        update = read_yaml(path.read_text(), str(path)) or {}
        if not isinstance(update, dict):
            raise ConfigError(f"{path}: expected section: key: value lines, as in {DEFAULTS_FILE}")
        _merge(cfg, update)
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got '{item}'")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), value)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_key(cfg, key, value, parse=False)
    return validate(cfg)


def from_args(args) -> dict:
    """The resolved, checked config of a parsed `python -m app train|infer|audit` command line."""
    overrides = {"seed": args.seed, "precision": args.precision, "num_workers": args.num_workers}
    if args.command in ("train", "audit"):
        overrides.update({"backbone.weights": args.weights,
                          "backbone.allow_nonstandard": args.allow_nonstandard_backbone})
    if args.command == "train":
        overrides.update({"finetune.epochs": args.epochs, "input.image_size": args.image_size})
    if args.command == "infer":
        overrides.update({"infer.tau": args.tau, "infer.tta": args.tta,
                          "infer.balance_test_prior": args.balance_test_prior})
    return load_config(args.config, overrides, args.set)


def changed(cfg: dict, base: dict | None = None) -> dict:
    """{'a.b': value} of the settings that differ from `base` (default: app/defaults.yaml)."""
    before = flat(defaults() if base is None else base)
    return {k: v for k, v in flat(cfg).items() if before.get(k, object()) != v}


def shaping(cfg: dict) -> dict:
    """The settings that shape the model and its data: every key but RUN_ONLY's."""
    return {k: v for k, v in flat(cfg).items()
            if not any(k == r or k.startswith(r + ".") for r in RUN_ONLY)}


def differences(before: dict, now: dict) -> list[str]:
    """'key was -> is' for every key of two `shaping` dicts that differs."""
    return [f"{k} {_json(before.get(k))} -> {_json(now.get(k))}"
            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


def one_line(values: dict) -> str:
    return ", ".join(f"{k}={_json(v)}" for k, v in values.items()) or "none"
