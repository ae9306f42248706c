"""One config: app/defaults.yaml, optionally a user file on top, then command-line overrides."""
import copy
import json
from pathlib import Path

import yaml

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")


def _merge(base: dict, update: dict, where: str = "") -> dict:
    for key, value in update.items():
        if key not in base:
            raise KeyError(f"unknown config key '{where}{key}' (see app/defaults.yaml)")
        if isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value
    return base


def set_key(cfg: dict, dotted: str, value, parse: bool = True) -> None:
    """Set cfg['a']['b'] from 'a.b'; with `parse`, a string value is parsed as YAML (numbers, lists,
    null...), except that a word YAML 1.1 reads as a boolean (no, yes, on, off) stays a word where the
    default is a word: `--set precision=no` is the mode "no", not False."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise KeyError(f"unknown config key '{dotted}' (see app/defaults.yaml)")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"unknown config key '{dotted}' (see app/defaults.yaml)")
    if parse and isinstance(value, str):
        parsed = yaml.safe_load(value)
        value = value if isinstance(parsed, bool) and isinstance(node[leaf], str) else parsed
    node[leaf] = value


def load_config(user_file: str | None = None, overrides: dict | None = None,
                sets: list[str] | None = None) -> dict:
    """defaults.yaml < user_file < `--set a.b=v` strings < explicit overrides (dotted keys, values as
    given: typed by the command line's options, never re-read as YAML)."""
    cfg = yaml.safe_load(DEFAULTS_FILE.read_text())
    if user_file:
        _merge(cfg, yaml.safe_load(Path(user_file).read_text()) or {})
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects section.key=value, got '{item}'")
        key, value = item.split("=", 1)
        set_key(cfg, key, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_key(cfg, key, value, parse=False)
    return cfg


def dump(cfg: dict) -> str:
    return json.dumps(copy.deepcopy(cfg), indent=2, sort_keys=False)
