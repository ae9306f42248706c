"""Weights files of every supported format, the OpenAI-ViT-B/32-only rule, the image build's weights
step, and the scan's image oddities."""
import hashlib
import importlib.util
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from app.backbone import (OPENAI_VIT_B32_SHA256, VIT_B_32, BackboneError, arch_name, build_visual,
                          load_backbone)
from app.config import load_config
from app.data import load_image
from app.scan import scan_train_dir
from tests.fixtures import save_proxy_format, tiny_clip


def _bcfg(path, allow=True):
    return dict(load_config()["backbone"], weights=str(path), allow_nonstandard=allow)


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "safetensors"])
def test_openai_key_layout_loads_from_a_local_file(tmp_path, fmt):
    clip = tiny_clip(seed=3).eval()
    path = tmp_path / "ViT-tiny.pt"   # safetensors too: the image stores the hub's copy under this name
    if fmt == "state_dict":
        state = clip.state_dict()
        assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state and "token_embedding.weight" in state
        torch.save(state, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(clip.state_dict(), str(path))
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


def test_vit_b_32_with_weights_that_are_not_openais_is_refused_without_flag(tmp_path):
    """Rule 1: OpenAI's weights only. A ViT-B/32 in OpenAI's layout (as LAION's would be) is refused
    unless its SHA-256 is a known OpenAI file; the flag lets it through for tests and benchmarks."""
    torch.manual_seed(0)
    state = {f"visual.{k}": v.half() for k, v in build_visual(VIT_B_32).state_dict().items()}
    path = tmp_path / "ViT-B-32.pt"
    torch.save(state, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(BackboneError) as refused:
        load_backbone(_bcfg(path, allow=False))
    msg = str(refused.value)
    for part in (f"holds a ViT-B/32 with SHA-256 {sha}", "rule 1", "ViT-B/32 only", "OpenAI's official weights",
                 *OPENAI_VIT_B32_SHA256, "--allow-nonstandard-backbone"):
        assert part in msg, part
    bb = load_backbone(_bcfg(path, allow=True))
    assert bb.arch == "ViT-B/32" and bb.sha256 == sha


def _fetch_weights():
    spec = importlib.util.spec_from_file_location(
        "fetch_weights", Path(__file__).resolve().parents[1] / "docker" / "fetch_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openai_hash_table_matches_openais_url_and_the_image_build():
    fw = _fetch_weights()
    assert fw.OPENAI_VIT_B32_SHA256 == OPENAI_VIT_B32_SHA256   # the build runs without the app package
    pcfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    torchscript_sha = pcfg["url"].split("/")[-2]               # .../clip/models/<sha256>/ViT-B-32.pt
    assert "TorchScript" in OPENAI_VIT_B32_SHA256[torchscript_sha]
    assert fw.OPENAI_URL == pcfg["url"]
    hub = f"https://huggingface.co/{pcfg['hf_hub'].rstrip('/')}/resolve/"
    assert fw.HUB_URL.startswith(hub) and fw.HUB_URL.endswith("/open_clip_model.safetensors")
    assert [url for url, _ in fw.SOURCES] == [fw.HUB_URL, fw.OPENAI_URL]
    assert all(sha in OPENAI_VIT_B32_SHA256 for _, sha in fw.SOURCES)


def test_fetch_weights_refuses_a_file_with_another_hash(tmp_path):
    fw = _fetch_weights()
    mirror = tmp_path / "mirror" / "ViT-B-32.pt"
    mirror.parent.mkdir()
    mirror.write_bytes(b"not OpenAI's weights")
    dest = tmp_path / "weights" / "ViT-B-32.pt"
    with pytest.raises(SystemExit, match="SHA-256 mismatch .* expected one of OpenAI's ViT-B/32 files"):
        fw.main(["fetch", str(dest), "--url", mirror.as_uri()])
    assert list(dest.parent.iterdir()) == []                   # nothing kept, not even the .part
    with pytest.raises(SystemExit, match="not the hash of any default source"):
        fw.main(["fetch", str(dest), "--sha256", "0" * 64])
    sha = hashlib.sha256(mirror.read_bytes()).hexdigest()      # an explicit hash is what counts
    assert fw.main(["fetch", str(dest), "--url", mirror.as_uri(), "--sha256", sha]) == 0
    assert dest.read_bytes() == mirror.read_bytes()
    assert dest.with_name("ViT-B-32.pt.sha256").read_text() == f"{sha}  ViT-B-32.pt\n"


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
    with pytest.raises(ValueError, match="unknown setting 'finetune.epoch' \\(did you mean finetune.epochs\\?\\)"):
        load_config(sets=["finetune.epoch=3"])
    # `--precision no` (fp32) and `--set precision=no` mean the mode "no": YAML 1.1 would read False,
    # which accelerate refuses; a boolean setting takes true/false only (YAML 1.2)
    assert load_config(overrides={"precision": "no"})["precision"] == "no"
    assert load_config(sets=["precision=no"])["precision"] == "no"
    assert load_config(sets=["noise.enabled=false"])["noise"]["enabled"] is False
    with pytest.raises(ValueError, match="expected true or false"):
        load_config(sets=["noise.enabled=no"])
    assert load_config(overrides={"backbone.weights": "2024.pt"})["backbone"]["weights"] == "2024.pt"


def test_noise_defaults_live_in_the_one_config():
    from app.noise import NOISE_DEFAULTS
    noise = load_config()["noise"]
    assert {k: noise[k] for k in NOISE_DEFAULTS} == NOISE_DEFAULTS


def test_resampling_to_the_native_grid_is_the_identity_and_larger_sizes_run():
    from app.backbone import resample_visual
    from tests.fixtures import TINY, tiny_visual
    visual, cfg = tiny_visual(seed=2).eval(), dict(TINY, act="gelu")
    same, same_cfg = resample_visual(visual, cfg, "native")
    assert same is visual and same_cfg == cfg
    same, _ = resample_visual(visual, cfg, 32)
    assert same is visual
    with torch.no_grad():                        # a constant grid stays constant under bicubic resampling
        visual.positional_embedding[1:] = visual.positional_embedding[1:].mean(0)
    for factor in (2, 3):                        # 2x and 3x the native 32 px
        size = 32 * factor
        big, big_cfg = resample_visual(visual, cfg, size)
        assert big_cfg["image_size"] == size and big.grid_size == (4 * factor, 4 * factor)
        pos, old = big.positional_embedding.detach(), visual.positional_embedding.detach()
        assert pos.shape == (16 * factor**2 + 1, TINY["width"])
        assert torch.equal(pos[0], old[0])                                   # class token untouched
        assert torch.allclose(pos[1:], old[1:2].expand_as(pos[1:]), atol=1e-5)
        for k, v in visual.state_dict().items():                            # every other weight as is
            if k != "positional_embedding":
                assert torch.equal(big.state_dict()[k], v), k
        assert big(torch.randn(2, 3, size, size)).shape == (2, TINY["output_dim"])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resample_visual(visual, cfg, 36)
