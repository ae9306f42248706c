"""Tiny, generated test material: a class-folder dataset with the web's oddities, and tiny
random-weight backbones in each supported file format.

    python -m tests.fixtures OUTDIR   # OUTDIR/train, OUTDIR/test, OUTDIR/test_labels.csv,
                                      # OUTDIR/tiny_backbone.pt (proxy format)
"""
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY = dict(image_size=32, patch_size=8, width=64, layers=2, heads=1, mlp_ratio=4.0, output_dim=32)
CLASSES = ["0000", "0001", "0002"]
COLOURS = [(200, 40, 40), (40, 180, 60), (50, 70, 210)]


def _photo(cls: int, rng, size=(48, 40)) -> Image.Image:
    """A noisy colour field with a class-specific stripe: easy for even a random tiny ViT + head."""
    arr = rng.normal(COLOURS[cls], 30, size=(size[1], size[0], 3))
    arr[:, (cls * 12):(cls * 12 + 10)] = 255 - np.array(COLOURS[cls])
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def make_dataset(root, per_class: int = 10, test_per_class: int = 3, seed: int = 0) -> Path:
    """train/<class>/*.jpg with every oddity of issue 2, an empty class folder, and a test folder."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        d = root / "train" / name
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            (d / f"img{k:02d}.jpg").write_bytes(_jpeg_bytes(_photo(c, rng)))
    odd = root / "train" / "0000"
    _photo(0, rng).convert("L").save(odd / "grey.jpg", "JPEG")
    _photo(0, rng).convert("CMYK").save(odd / "cmyk.jpg", "JPEG")
    _photo(0, rng).convert("P").save(odd / "palette.png")
    rgba = _photo(0, rng).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(odd / "alpha.png")
    png = io.BytesIO()
    _photo(1, rng).save(png, "PNG")
    (root / "train" / "0001" / "png_named.jpg").write_bytes(png.getvalue())
    full = _jpeg_bytes(_photo(1, rng, (96, 80)))
    (root / "train" / "0001" / "truncated.jpg").write_bytes(full[: len(full) * 2 // 3])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    (root / "train" / "0002" / "rotated.jpg").write_bytes(_jpeg_bytes(_photo(2, rng), exif=exif.tobytes()))
    (root / "train" / "0002" / "empty.jpg").write_bytes(b"")
    (root / "train" / "0002" / "notes.txt").write_text("not an image")
    (root / "train" / "0002" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage" * 10)
    (root / "train" / "0003").mkdir(exist_ok=True)  # an empty class folder: the class still exists
    test = root / "test"
    test.mkdir(parents=True, exist_ok=True)
    lines = ["image,label"]
    for c, name in enumerate(CLASSES):
        for k in range(test_per_class):
            fname = f"t{c}{k}.jpg"
            (test / fname).write_bytes(_jpeg_bytes(_photo(c, rng)))
            lines.append(f"{fname},{name}")
    (test / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "test_labels.csv").write_text("\n".join(lines) + "\n")
    return root


def tiny_visual(seed: int = 0, quick_gelu: bool = False):
    from open_clip.transformer import QuickGELU, VisionTransformer
    torch.manual_seed(seed)
    kw = {"act_layer": QuickGELU} if quick_gelu else {}
    return VisionTransformer(**TINY, **kw)


def save_proxy_format(path, seed: int = 0) -> Path:
    """The proxy format of ../shared/models/README.md: {config, visual}."""
    torch.save({"config": dict(TINY), "visual": tiny_visual(seed).state_dict()}, path)
    return Path(path)


def tiny_clip(seed: int = 0):
    """A whole open_clip CLIP (vision + text) whose state dict has OpenAI's key layout."""
    from open_clip.model import CLIP
    torch.manual_seed(seed)
    return CLIP(embed_dim=TINY["output_dim"],
                vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=64),
                text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=1, layers=1),
                quick_gelu=True)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-fixture")
    make_dataset(out)
    save_proxy_format(out / "tiny_backbone.pt")
    print(f"wrote {out}/train, {out}/test, {out}/test_labels.csv, {out}/tiny_backbone.pt")
