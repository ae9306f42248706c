"""Images in, tensors out: tolerant decoding, CLIP preprocessing, datasets and the epoch sampler.

The decoding workers hand over uint8 crops (a quarter of float32's bytes through /dev/shm or a pipe);
`normalize` turns them into the model's float input on the device, with the backbone's mean and std.
"""
import random
import warnings

import torch
from open_clip.transform import MaybeToTensor, image_transform
from PIL import Image, ImageFile, ImageOps
from torchvision import transforms as T

# Web images: truncated JPEGs are decoded as far as the bytes go instead of raising.
ImageFile.LOAD_TRUNCATED_IMAGES = True
warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def load_image(path, min_side: int | None = None) -> Image.Image:
    """Decode any file Pillow reads (whatever its extension says) into an upright RGB image.

    `min_side` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (Image.draft) when the photo is
    much larger than needed; the result keeps its shorter side >= min_side.
    Raises OSError / ValueError for files that cannot be decoded at all.
    """
    with Image.open(path) as im:
        if min_side and im.format == "JPEG":
            w, h = im.size
            scale = min(w, h) / min_side
            if scale >= 2:
                im.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")


class PixelTransform:
    """PIL image -> uint8 CHW crop (`ops`: geometry and augmentation only), and the per-channel mean
    and std (of pixels in [0, 1]) that `normalize` applies to it on the device."""

    def __init__(self, ops, mean, std):
        self.ops = T.Compose([*ops, T.PILToTensor()])
        self.stats = torch.tensor([list(mean), list(std)], dtype=torch.float32)   # (2, 3)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.ops(img)


def normalize(images: torch.Tensor, stats: torch.Tensor, ok: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 crops (N, 3, H, W) -> the model's float input: ToTensor's x / 255, then Normalize's
    (x - mean) / std, the same operations in the same order as torchvision's float pipeline. Images
    with ok False (undecodable files) become zeros, the normalised mean colour: a blank input."""
    mean, std = stats[0].view(-1, 1, 1), stats[1].view(-1, 1, 1)
    x = images.float().div_(255).sub_(mean).div_(std)
    if ok is not None:
        x.masked_fill_(~ok.bool().view(-1, 1, 1, 1), 0.0)     # no host sync: no boolean indexing
    return x


# File suffixes of the formats Pillow can read (.jpg, .png, .webp, ...), lower case.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def decodes(path) -> bool:
    """Whether the file's content decodes as an image (JPEGs at 1/8 scale: a cheap check)."""
    try:
        load_image(path, min_side=1)
    except Exception:  # noqa: BLE001 - any decoder failure means "not an image"
        return False
    return True


def eval_transform(pre: dict) -> PixelTransform:
    """open_clip's own inference preprocessing (resize shorter side, centre crop) to uint8; its
    ToTensor and Normalize run on the device (`normalize`)."""
    clip = image_transform(pre["image_size"], is_train=False, mean=tuple(pre["mean"]),
                           std=tuple(pre["std"]), interpolation="bicubic", resize_mode="shortest")
    ops = [t for t in clip.transforms if not isinstance(t, (MaybeToTensor, T.ToTensor, T.Normalize))]
    return PixelTransform(ops, pre["mean"], pre["std"])


def train_transform(pre: dict, crop_scale, hflip: bool) -> PixelTransform:
    """Light augmentation for fine-tuning: random resized crop (+ horizontal flip), on the decoded
    uint8 image. No colour jitter: colour is a species cue."""
    ops = [T.RandomResizedCrop(pre["image_size"], scale=tuple(crop_scale),
                               interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    return PixelTransform(ops, pre["mean"], pre["std"])


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 crop, index, decoded ok). A file that cannot be decoded yields a black crop and ok=False
    (`normalize` makes it a blank input), so one bad file never stops a pass and every input keeps
    its row. `stats`: the transform's mean and std, applied on the device."""

    def __init__(self, paths, transform: PixelTransform, image_size: int, seed: int | None = None):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.stats = transform.stats
        self.image_size = image_size
        self.seed = seed          # set: augmentation is a function of (seed, epoch, index)
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img, ok = load_image(self.paths[i], min_side=self.image_size), True
        except Exception:  # noqa: BLE001 - any decoder failure means "unreadable"
            img, ok = Image.new("RGB", (self.image_size, self.image_size)), False
        if self.seed is None:
            x = self.transform(img)
        else:
            # Reproducible augmentation whatever the worker count or a resume point.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
                x = self.transform(img)
        if not ok:
            x = torch.zeros_like(x)
        return x, i, ok


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch, a pure function of (seed, epoch): resuming at epoch k sees
    exactly the order an uninterrupted run saw. accelerate calls set_epoch on it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return iter(order)
