"""Weights files of every supported format, the ViT-B/32-only rule, and the scan's image oddities."""
import pytest
import torch
from PIL import Image

from app.backbone import VIT_B_32, BackboneError, arch_name, load_backbone
from app.config import load_config
from app.data import load_image
from app.scan import scan_train_dir
from tests.fixtures import save_proxy_format, tiny_clip


def _bcfg(path, allow=True):
    return dict(load_config()["backbone"], weights=str(path), allow_nonstandard=allow)


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript"])
def test_openai_key_layout_loads_from_a_local_file(tmp_path, fmt):
    clip = tiny_clip(seed=3).eval()
    path = tmp_path / "ViT-tiny.pt"
    if fmt == "state_dict":
        state = clip.state_dict()
        assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state and "token_embedding.weight" in state
        torch.save(state, path)
    else:
        torch.jit.script(clip).save(str(path))
    bb = load_backbone(_bcfg(path))
    assert bb.config["act"] == "quick_gelu" and bb.config["width"] == 64 and bb.config["layers"] == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bb.visual(x), clip.visual(x), atol=1e-5)
    assert len(bb.sha256) == 64


def test_proxy_format_and_refusal_without_flag(tmp_path):
    path = save_proxy_format(tmp_path / "proxy.pt")
    assert load_backbone(_bcfg(path)).config["act"] == "gelu"
    with pytest.raises(BackboneError, match="ViT-B/32 only"):
        load_backbone(_bcfg(path, allow=False))


def test_vit_b_32_is_recognised():
    assert arch_name(VIT_B_32) == "ViT-B/32"
    assert arch_name(dict(VIT_B_32, patch_size=16)) != "ViT-B/32"


def test_garbage_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="--weights"):
        load_backbone(_bcfg(bad))


def test_scan_and_decoding_oddities(tiny):
    classes, images, skipped = scan_train_dir(tiny / "train")
    assert classes == ["0000", "0001", "0002", "0003"]
    assert list(skipped["path"]) == ["0002/empty.jpg"]
    assert images["hash"].str.len().eq(40).all()
    train = tiny / "train"
    for name in ("0000/grey.jpg", "0000/cmyk.jpg", "0000/palette.png", "0000/alpha.png",
                 "0001/png_named.jpg", "0001/truncated.jpg"):
        im = load_image(train / name)
        assert im.mode == "RGB" and im.size[0] > 0, name
    assert load_image(train / "0002/rotated.jpg").size == (40, 48)   # EXIF orientation applied
    assert Image.open(train / "0002/rotated.jpg").size == (48, 40)
    with pytest.raises(Exception):
        load_image(train / "0002/garbage.jpg")


def test_config_overrides_and_unknown_keys():
    cfg = load_config(overrides={"finetune.epochs": 3}, sets=["lora.targets=[q, v]", "infer.tau=0.5"])
    assert cfg["finetune"]["epochs"] == 3 and cfg["lora"]["targets"] == ["q", "v"]
    assert cfg["infer"]["tau"] == 0.5
    with pytest.raises(KeyError, match="unknown config key"):
        load_config(sets=["finetune.epoch=3"])


def test_noise_defaults_live_in_the_one_config():
    from app.noise import NOISE_DEFAULTS
    noise = load_config()["noise"]
    assert {k: noise[k] for k in NOISE_DEFAULTS} == NOISE_DEFAULTS
