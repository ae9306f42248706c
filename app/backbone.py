"""Stage 2, backbone: CLIP ViT-B/32's visual tower with OpenAI's weights, as a plain open_clip module.

Every source ends in the same place: a weights file on disk (hashed), read into a visual state dict,
whose shapes give the architecture (as data, like open_clip's model_configs), built as
open_clip.transformer.VisionTransformer and loaded strictly.
"""
import dataclasses
import os
import socket
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from .config import ConfigError
from .scan import file_hash

# The only backbone the contest allows, in VisionTransformer's terms.
VIT_B_32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0,
                output_dim=512, act="quick_gelu")
# Where the Docker image bakes OpenAI's weights; used when --weights is not given.
WEIGHTS_ENV = "CLIP_WEIGHTS_FILE"

# The contest's rule 1 allows OpenAI's official ViT-B/32 weights only, so a weights file is accepted
# (without --allow-nonstandard-backbone) only when its SHA-256 is one of these files'. The same table
# is in docker/fetch_weights.py, which runs in the image build without this package; a test checks
# that the two agree. The image bakes in one of these files byte for byte and derives nothing.
OPENAI_VIT_B32_SHA256 = {
    # OpenAI's TorchScript archive (fp16); the hash is part of OpenAI's own download URL
    # .../clip/models/<sha256>/ViT-B-32.pt (in openai/CLIP's clip.py and open_clip's `openai` tag).
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af":
        "OpenAI's ViT-B-32.pt (TorchScript archive)",
    # open_clip's Hugging Face hub copy of the same weights (fp32 state dict, 605,143,284 bytes):
    # timm/vit_base_patch32_clip_224.openai, open_clip_model.safetensors, revision
    # a6f597a30f7b82c51704746581f9a4e41421e878. The hash is the hub's LFS sha256 of that file, as
    # recorded by projects that pin it (e.g. github.com/nilubhatt/campaign-poc, README).
    "e6d1bd7789aa45192b3bf90570a789b478bae1b74ebcce7eddd908e83a2b7c31":
        "open_clip's hub copy timm/vit_base_patch32_clip_224.openai (open_clip_model.safetensors)",
}


class BackboneError(RuntimeError):
    """A backbone that cannot be loaded or is not allowed: the run stops with this message."""


@dataclass
class Backbone:
    visual: nn.Module
    config: dict        # VisionTransformer arguments (+ act), enough to rebuild it
    arch: str           # "ViT-B/32" or a description of the nonstandard one
    sha256: str         # of the weights file
    source: str         # the weights file

    def resampled(self, image_size) -> "Backbone":
        """The same backbone for `image_size`-px input (`native`: this one); see resample_visual."""
        visual, config = resample_visual(self.visual, self.config, image_size)
        return dataclasses.replace(self, visual=visual, config=config)

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


def resample_visual(visual: VisionTransformer, config: dict, image_size) -> tuple[VisionTransformer, dict]:
    """The same tower for `image_size`-px input (`native` or None: unchanged): a copy whose position
    embeddings are resampled to the new patch grid (bicubic, class token untouched: open_clip's own
    resize_pos_embed). Every other weight is copied as is: the backbone and its weights stay the
    contest's, at a larger input resolution."""
    if image_size in (None, "native") or int(image_size) == config["image_size"]:
        return visual, config
    if int(image_size) % config["patch_size"]:
        raise ValueError(f"input.image_size {image_size} is not a multiple of the patch size {config['patch_size']}")
    from open_clip.model import resize_pos_embed
    new_config = {**config, "image_size": int(image_size)}
    resized = build_visual(new_config).to(next(visual.parameters()).device)
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    resize_pos_embed(state, SimpleNamespace(visual=resized), interpolation="bicubic")
    resized.load_state_dict({k[len("visual."):]: v for k, v in state.items()}, strict=True)
    return resized.train(visual.training), new_config


def _is_safetensors(path) -> bool:
    """By content, not name: the image stores whichever file it fetched as ViT-B-32.pt. A safetensors
    file starts with its header's length (8 bytes, little-endian) and then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little")
    return len(head) == 9 and head[8:9] == b"{" and header_len < os.path.getsize(path)


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
    if _is_safetensors(path):
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
    if not _hub_reachable():       # offline: the hub's cache only, no minute of retries
        import huggingface_hub.constants
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        pcfg = open_clip.get_pretrained_cfg(bcfg["model"], bcfg["pretrained"])
        if not pcfg:
            raise ValueError(f"open_clip has no pretrained tag {bcfg['model']}/{bcfg['pretrained']}")
        return Path(open_clip.download_pretrained(pcfg))
    except Exception as e:  # noqa: BLE001 - offline, hub errors, ...
        raise BackboneError(
            f"could not obtain {bcfg['model']} '{bcfg['pretrained']}' weights ({type(e).__name__}: {e}). "
            f"Offline? Pass a local file with --weights FILE (OpenAI's ViT-B-32.pt or open_clip's "
            f"open_clip_model.safetensors of it), or set {WEIGHTS_ENV}.") from e


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (HF_ENDPOINT), or to the HTTPS proxy when one
    is set, opens within `timeout_s`: without one, huggingface_hub would retry for about a minute."""
    url = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
           or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    parts = urllib.parse.urlsplit(url if "//" in url else f"//{url}")
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout_s):
            return True
    except (OSError, TypeError):
        return False


def check_settings(config: dict, cfg: dict) -> None:
    """The settings that depend on the backbone, checked as soon as it is loaded, before the frozen pass:
    input sizes a whole number of patches, lora.last_blocks at most the tower's blocks. `config`: the
    backbone's VisionTransformer config."""
    patch, native = config["patch_size"], config["image_size"]
    for key in ("input.image_size", "features.image_size"):
        section, name = key.split(".")
        size = cfg[section][name]
        if size != "native" and size % patch:
            below = max(patch, size // patch * patch)
            raise ConfigError(f"{key}={size} is not a multiple of the backbone's patch ({patch} px): use "
                              f"{below} or {below + patch}, or native ({native} px)")
    blocks = cfg["lora"]["last_blocks"]
    if blocks != "all" and blocks > config["layers"]:
        raise ConfigError(f"lora.last_blocks={blocks}: the backbone has {config['layers']} blocks; use at most "
                          f"{config['layers']}, or all")


def load_backbone(bcfg: dict) -> Backbone:
    """The visual tower, refused unless the file is one of OpenAI's ViT-B/32 files (by SHA-256) or
    --allow-nonstandard-backbone was given."""
    path = resolve_weights_file(bcfg)
    try:
        cfg, state = read_visual_state(path)
    except BackboneError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BackboneError(f"--weights {path}: cannot read weights ({type(e).__name__}: {e})") from e
    arch = arch_name(cfg)
    sha256 = file_hash(path, "sha256")
    if sha256 not in OPENAI_VIT_B32_SHA256 and not bcfg["allow_nonstandard"]:
        known = "; ".join(f"{name} ({h})" for h, name in OPENAI_VIT_B32_SHA256.items())
        raise BackboneError(
            f"{path} holds a {arch} with SHA-256 {sha256}, which is not a known file of OpenAI's "
            f"weights. The contest (rule 1) allows CLIP ViT-B/32 only, with OpenAI's official "
            f"weights, so the backbone file is checked by SHA-256 against: {known}. Pass one of these "
            f"with --weights (the Docker image has one baked in); --allow-nonstandard-backbone is for "
            f"tests and proxy benchmarks, never for a submission.")
    visual = build_visual(cfg)
    visual.load_state_dict(state, strict=True)
    return Backbone(visual=visual, config=cfg, arch=arch, sha256=sha256, source=str(path))
