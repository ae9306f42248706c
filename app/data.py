"""Images in, tensors out: tolerant decoding, CLIP preprocessing, datasets and the epoch sampler."""
import random
import warnings

import torch
from open_clip.transform import image_transform
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


def eval_transform(pre: dict):
    """open_clip's own inference preprocessing: resize shorter side, centre crop, normalise."""
    return image_transform(pre["image_size"], is_train=False, mean=tuple(pre["mean"]),
                           std=tuple(pre["std"]), interpolation="bicubic", resize_mode="shortest")


def train_transform(pre: dict, crop_scale, hflip: bool):
    """Light augmentation for fine-tuning: random resized crop (+ horizontal flip). No colour jitter:
    colour is a species cue."""
    ops = [T.RandomResizedCrop(pre["image_size"], scale=tuple(crop_scale),
                               interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(pre["mean"], pre["std"])]
    return T.Compose(ops)


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, index, decoded ok). A file that cannot be decoded yields a blank image and
    ok=False, so one bad file never stops a pass and every input keeps its row."""

    def __init__(self, paths, transform, image_size: int, seed: int | None = None):
        self.paths = [str(p) for p in paths]
        self.transform = transform
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
            x = torch.zeros_like(x)  # the normalised mean colour: a truly blank input
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
