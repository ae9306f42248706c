"""Stage 2, backbone: CLIP ViT-B/32's visual tower with OpenAI's weights, as a plain open_clip module.

Every source ends in the same place: a weights file on disk (hashed), read into a visual state dict,
whose shapes give the architecture (as data, like open_clip's model_configs), built as
open_clip.transformer.VisionTransformer and loaded strictly.
"""
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from .scan import file_hash

# The only backbone the contest allows, in VisionTransformer's terms.
VIT_B_32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0,
                output_dim=512, act="quick_gelu")
# Where the Docker image bakes OpenAI's ViT-B-32.pt; used when --weights is not given.
WEIGHTS_ENV = "CLIP_WEIGHTS_FILE"


class BackboneError(RuntimeError):
    """A backbone that cannot be loaded or is not allowed: the run stops with this message."""


@dataclass
class Backbone:
    visual: nn.Module
    config: dict        # VisionTransformer arguments (+ act), enough to rebuild it
    arch: str           # "ViT-B/32" or a description of the nonstandard one
    sha256: str         # of the weights file
    source: str         # the weights file

    @property
    def preprocess(self) -> dict:
        return {"image_size": self.config["image_size"], "mean": list(OPENAI_DATASET_MEAN),
                "std": list(OPENAI_DATASET_STD)}


def arch_name(cfg: dict) -> str:
    if all(cfg[k] == v for k, v in VIT_B_32.items()):
        return "ViT-B/32"
    return (f"nonstandard ViT (width {cfg['width']}, {cfg['layers']} layers, patch {cfg['patch_size']}, "
            f"{cfg['image_size']} px, {cfg['output_dim']}-d, {cfg['act']})")


def build_visual(cfg: dict) -> VisionTransformer:
    kwargs = {k: v for k, v in cfg.items() if k != "act"}
    act = QuickGELU if cfg["act"] == "quick_gelu" else nn.GELU
    return VisionTransformer(**kwargs, act_layer=act)


def _is_torchscript(path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_visual_state(path) -> tuple[dict, dict]:
    """(VisionTransformer config, visual state dict in fp32) from any supported weights file:
    OpenAI's TorchScript ViT-B-32.pt, an OpenAI/open_clip state dict (.pt/.bin/.safetensors,
    whole CLIP or visual only), or the proxy format {config, visual}."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        obj = load_file(path)
    elif _is_torchscript(path):
        obj = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "config" in obj and "visual" in obj:   # proxy format
        c = obj["config"]
        act = "quick_gelu" if c.get("act") == "quick_gelu" else "gelu"
        cfg = dict(image_size=c["image_size"], patch_size=c["patch_size"], width=c["width"],
                   layers=c["layers"], heads=c["heads"], mlp_ratio=float(c.get("mlp_ratio", 4.0)),
                   output_dim=c["output_dim"], act=act)
        return cfg, {k: v.float() for k, v in obj["visual"].items()}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    state = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if "conv1.weight" not in state or "proj" not in state:
        raise BackboneError(f"{path}: not a CLIP ViT checkpoint (no visual conv1/proj weights)")
    width, _, patch, _ = state["conv1.weight"].shape
    grid = round((state["positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    # OpenAI's layout: 64-d attention heads, QuickGELU (the pretrained tag records quick_gelu=True).
    cfg = dict(image_size=patch * grid, patch_size=patch, width=width, layers=layers,
               heads=max(1, width // 64), mlp_ratio=4.0, output_dim=state["proj"].shape[1],
               act="quick_gelu")
    return cfg, {k: v.float() for k, v in state.items()}


def resolve_weights_file(bcfg: dict) -> Path:
    """--weights, else the baked-in file named by $CLIP_WEIGHTS_FILE, else open_clip's download
    of ViT-B-32/openai. Never random weights: failure is a BackboneError naming --weights."""
    if bcfg["weights"]:
        path = Path(bcfg["weights"])
        if not path.is_file():
            raise BackboneError(f"--weights {path}: file not found")
        return path
    baked = os.environ.get(WEIGHTS_ENV)
    if baked and Path(baked).is_file():
        return Path(baked)
    import open_clip
    try:
        pcfg = open_clip.get_pretrained_cfg(bcfg["model"], bcfg["pretrained"])
        if not pcfg:
            raise ValueError(f"open_clip has no pretrained tag {bcfg['model']}/{bcfg['pretrained']}")
        return Path(open_clip.download_pretrained(pcfg))
    except Exception as e:  # noqa: BLE001 - offline, hub errors, ...
        raise BackboneError(
            f"could not obtain {bcfg['model']} '{bcfg['pretrained']}' weights ({type(e).__name__}: {e}). "
            f"Offline? Pass a local file with --weights FILE (OpenAI's ViT-B-32.pt or an open_clip "
            f"state dict), or set {WEIGHTS_ENV}.") from e


def load_backbone(bcfg: dict) -> Backbone:
    """The visual tower, refused unless it is ViT-B/32 or --allow-nonstandard-backbone was given."""
    path = resolve_weights_file(bcfg)
    try:
        cfg, state = read_visual_state(path)
    except BackboneError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BackboneError(f"--weights {path}: cannot read weights ({type(e).__name__}: {e})") from e
    arch = arch_name(cfg)
    if arch != "ViT-B/32" and not bcfg["allow_nonstandard"]:
        raise BackboneError(f"{path} holds a {arch}; the contest allows CLIP ViT-B/32 only. "
                            "Use --allow-nonstandard-backbone for tests and proxy benchmarks.")
    visual = build_visual(cfg)
    visual.load_state_dict(state, strict=True)
    return Backbone(visual=visual, config=cfg, arch=arch, sha256=file_hash(path, "sha256"), source=str(path))
