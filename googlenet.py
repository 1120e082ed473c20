"""GoogLeNet (Inception v1) in one file: model, data, device, training loop, checkpoints, CLI.

Two architectures, one channel table (Szegedy et al. 2015, "Going deeper with convolutions"):
  original  the paper's 224x224 net: 7x7/2 stem, LRN, two auxiliary classifiers, no BatchNorm
  tiny      the 64x64 variant for Tiny ImageNet: 3x3/1 stem that shrinks the image slower,
            BatchNorm after every conv, same Inception blocks 3a-5b

Run it:
  python googlenet.py --dataset tiny --data-dir data --download          # Tiny ImageNet, auto device
  python googlenet.py --dataset tiny --device xla                        # TPU (all cores)
  torchrun --standalone --nproc_per_node 8 googlenet.py --dataset tiny   # 8 GPUs, DDP
  python googlenet.py --dataset cifar10 --arch original --image-size 224 # the paper's net on CIFAR-10
  python googlenet.py --dataset folder --data-dir my_photos             # DIR/train/<class>/*, DIR/val/<class>/*
  python googlenet.py --resume runs/tiny/last.pt                          # continue a run
  python googlenet.py --evaluate --resume runs/tiny/best.pt               # only evaluate
  python googlenet.py --dataset tiny --benchmark                          # default path vs a naive loop

Use it from your own code (plain arguments, no argparse):
  import googlenet
  info = googlenet.load_dataset("cifar10", "data")
  model = googlenet.build_model("tiny", num_classes=10)
  train_loader, val_loader = googlenet.make_loaders(info, batch_size=128, image_size=32)
  history = googlenet.train(model, train_loader, val_loader, googlenet.model_config_for(info, "tiny", 32),
                            googlenet.TrainConfig(epochs=15), checkpoint_dir="runs/mine")
  model, config = googlenet.load_for_inference("runs/mine/best.pt")

Sections: model, data, device, train/evaluate, checkpoint, CLI (and the benchmarks it runs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A problem with the user's input; `str(error)` is one line that says what to do."""
    everywhere = False  # raised by every process at once, from a decision they took together


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated or not one of ours."""


class ImageDecodeError(UserError):
    """A file that cannot be decoded as an image."""


class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than the caller allows (or than PIL decodes at all)."""


# ---------------------------------------------------------------------------------------------
# Model: the Inception block, the aux head and both nets, built from the paper's channel table
# ---------------------------------------------------------------------------------------------

# The paper's Table 1, one row per Inception block:
# (in_channels, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj)
INCEPTION_TABLE = {
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}
ARCHS = ("original", "tiny")

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux1", "aux2"])
GoogLeNetOutputs.__doc__ = """Training-mode output: main logits and the two auxiliary heads' logits
(after 4a and 4d), each [batch, num_classes]."""


class ConvReLU(nn.Sequential):
    """Conv (same padding) -> optional BatchNorm -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, batch_norm=False):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                            padding=kernel_size // 2, bias=not batch_norm)]  # BN has its own shift
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ChannelLRN(nn.Module):
    """The paper's local response normalisation across channels, with nn.LocalResponseNorm's
    numbers: x / (k + alpha * mean of x^2 over `size` neighbouring channels) ** beta. The channel
    window is a 1x1 convolution with a fixed band matrix, because nn.LocalResponseNorm's 3-D
    pooling is slow in channels_last and bf16: with this the whole original net trains 1.5x faster
    at 224 on a 2-core CPU (26 against 17 img/s)."""

    def __init__(self, channels, size=5, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        self.alpha, self.beta, self.k = alpha, beta, k
        offset = torch.arange(channels)[None, :] - torch.arange(channels)[:, None]  # in - out
        band = ((offset >= -(size // 2)) & (offset <= (size - 1) // 2)).float() / size
        self.register_buffer("band", band[:, :, None, None], persistent=False)

    def forward(self, x):
        mean_square = F.conv2d(x * x, self.band.to(x.dtype))
        return x / (self.k + self.alpha * mean_square).pow(self.beta)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->5x5 | 3x3 max-pool->1x1."""

    def __init__(self, in_channels, ch1x1, ch3x3_reduce, ch3x3, ch5x5_reduce, ch5x5, pool_proj,
                 batch_norm=False):
        super().__init__()
        self.branch1 = ConvReLU(in_channels, ch1x1, 1, batch_norm=batch_norm)
        self.branch2 = nn.Sequential(ConvReLU(in_channels, ch3x3_reduce, 1, batch_norm=batch_norm),
                                     ConvReLU(ch3x3_reduce, ch3x3, 3, batch_norm=batch_norm))
        # A real 5x5 as in the paper (torchvision uses 3x3 here for historical reasons).
        self.branch3 = nn.Sequential(ConvReLU(in_channels, ch5x5_reduce, 1, batch_norm=batch_norm),
                                     ConvReLU(ch5x5_reduce, ch5x5, 5, batch_norm=batch_norm))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                     ConvReLU(in_channels, pool_proj, 1, batch_norm=batch_norm))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class AuxClassifier(nn.Module):
    """The paper's auxiliary head: avg-pool to 4x4 -> 1x1 conv 128 -> FC 1024 -> dropout 0.7 -> FC."""

    def __init__(self, in_channels, num_classes, batch_norm=False, dropout=0.7):
        super().__init__()
        self.conv = ConvReLU(in_channels, 128, 1, batch_norm=batch_norm)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x):
        # The paper's 5x5/3 average pool maps the 224-net's 14x14 map to 4x4. Other input sizes
        # (the 64x64 variant's 8x8, CIFAR's 4x4) pool adaptively to the same 4x4, so the head's
        # shapes and parameter count never depend on the image size.
        if tuple(x.shape[-2:]) == (14, 14):
            x = F.avg_pool2d(x, kernel_size=5, stride=3)
        else:
            x = F.adaptive_avg_pool2d(x, 4)
        x = torch.flatten(self.conv(x), 1)
        x = self.dropout(F.relu(self.fc1(x), inplace=True))
        return self.fc2(x)


class GoogLeNet(nn.Module):
    """GoogLeNet / Inception v1.

    forward(x) returns the main logits [N, num_classes] in eval mode (or without aux heads), and a
    `GoogLeNetOutputs(logits, aux1, aux2)` in training mode when the aux heads are on.
    """

    def __init__(self, arch="tiny", num_classes=200, aux_logits=True, batch_norm=None,
                 dropout=0.4, aux_dropout=0.7):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
        if batch_norm is None:
            batch_norm = arch == "tiny"
        self.arch, self.aux_logits, self.batch_norm = arch, aux_logits, batch_norm
        bn = batch_norm

        if arch == "original":
            # 224 -> 112 (conv 7x7/2) -> 56 (pool) -> 28 (pool); LRN as in the paper unless BN replaces it.
            lrn = (lambda c: []) if bn else (lambda c: [ChannelLRN(c, 5, alpha=1e-4, beta=0.75, k=1.0)])
            self.stem = nn.Sequential(
                ConvReLU(3, 64, 7, stride=2, batch_norm=bn), nn.MaxPool2d(3, 2, padding=1), *lrn(64),
                ConvReLU(64, 64, 1, batch_norm=bn), ConvReLU(64, 192, 3, batch_norm=bn), *lrn(192),
                nn.MaxPool2d(3, 2, padding=1))
        else:
            # 64 -> 64 (conv 3x3/1) -> 32 (pool) -> 16 (pool): a 64x64 image keeps enough spatial
            # detail for the Inception blocks (the 224 stem would leave 2x2 maps at 5b).
            self.stem = nn.Sequential(
                ConvReLU(3, 64, 3, batch_norm=bn), nn.MaxPool2d(3, 2, padding=1),
                ConvReLU(64, 192, 3, batch_norm=bn), nn.MaxPool2d(3, 2, padding=1))

        t = INCEPTION_TABLE
        self.inception3a = Inception(*t["3a"], batch_norm=bn)
        self.inception3b = Inception(*t["3b"], batch_norm=bn)
        self.maxpool3 = nn.MaxPool2d(3, 2, padding=1)
        self.inception4a = Inception(*t["4a"], batch_norm=bn)
        self.inception4b = Inception(*t["4b"], batch_norm=bn)
        self.inception4c = Inception(*t["4c"], batch_norm=bn)
        self.inception4d = Inception(*t["4d"], batch_norm=bn)
        self.inception4e = Inception(*t["4e"], batch_norm=bn)
        self.maxpool4 = nn.MaxPool2d(3, 2, padding=1)
        self.inception5a = Inception(*t["5a"], batch_norm=bn)
        self.inception5b = Inception(*t["5b"], batch_norm=bn)
        if aux_logits:
            self.aux1 = AuxClassifier(t["4b"][0], num_classes, batch_norm=bn, dropout=aux_dropout)
            self.aux2 = AuxClassifier(t["4e"][0], num_classes, batch_norm=bn, dropout=aux_dropout)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = the paper's 7x7 average pool at 224
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stem(x)
        x = self.inception3a(x)
        x = self.inception3b(x)
        x = self.maxpool3(x)
        x = self.inception4a(x)
        use_aux = self.training and self.aux_logits
        aux1 = self.aux1(x) if use_aux else None
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        aux2 = self.aux2(x) if use_aux else None
        x = self.inception4e(x)
        x = self.maxpool4(x)
        x = self.inception5a(x)
        x = self.inception5b(x)
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if use_aux:
            return GoogLeNetOutputs(logits, aux1, aux2)
        return logits


def init_weights(model):
    """Initialise for training from scratch. Convs followed by BatchNorm: Kaiming-normal (fan_out),
    as torchvision does. Convs without BatchNorm (the paper's net): Kaiming-normal over fan_in, which
    keeps the activation scale through 22 ReLU layers; fan_out would not here, because the Inception
    reduce convs have few outputs (16) and many inputs (480), and it blew the paper net up to NaN.
    FCs: N(0, 0.01), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if m.bias is None:  # BN follows (ConvReLU drops the bias exactly then)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(arch, num_classes, **options):
    """Build a GoogLeNet. arch: "original" or "tiny". options: aux_logits (True), batch_norm
    (None = the arch's default: on for tiny, off for original), dropout (0.4), aux_dropout (0.7).
    Raises ValueError on an unknown arch, option or a class count below 1."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a whole number of at least 1, got {num_classes!r}")
    unknown = set(options) - {"aux_logits", "batch_norm", "dropout", "aux_dropout"}
    if unknown:
        raise ValueError(f"unknown model option {sorted(unknown)[0]!r}: use aux_logits, batch_norm, "
                         f"dropout or aux_dropout")
    return GoogLeNet(arch=arch, num_classes=num_classes, **options)


# ---------------------------------------------------------------------------------------------
# Data: datasets listed from disk, decoded once into uint8 stores, augmented per batch on the device
# ---------------------------------------------------------------------------------------------

DATASETS = ("tiny", "cifar10", "folder", "synthetic")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


@dataclass
class Split:
    """One split before decoding: either image files or already-decoded uint8 HWC arrays."""
    labels: list
    files: list | None = None
    arrays: np.ndarray | None = None  # [N, H, W, 3] uint8 (CIFAR-10, synthetic)

    def __len__(self):
        return len(self.labels)

    def subset(self, n, seed=0):
        """About n items drawn evenly from every class (seeded, order kept), so a quick run still
        sees all classes; the whole split when n is 0 or at least its size."""
        if not n or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        labels = np.asarray(self.labels)
        classes = np.unique(labels)
        per_class, extra = divmod(n, len(classes))
        picked = []
        for k, c in enumerate(rng.permutation(classes)):  # which classes get one more: seeded too
            members = np.flatnonzero(labels == c)
            take = min(len(members), per_class + (k < extra))
            picked.append(rng.choice(members, take, replace=False))
        return self.take(np.sort(np.concatenate(picked)))

    def take(self, index):
        return Split([self.labels[i] for i in index],
                     [self.files[i] for i in index] if self.files is not None else None,
                     self.arrays[index] if self.arrays is not None else None)


@dataclass
class DatasetInfo:
    """A dataset's splits and everything a checkpoint must remember about it."""
    name: str
    train: Split
    val: Split
    class_names: list          # short human names, for display
    class_ids: list            # wnids / folder names / CIFAR names
    mean: tuple
    std: tuple
    source_size: int           # images are decoded to this square size, then augmented on device
    root: str | None = None


def decode_image(source, size, max_pixels=None):
    """Decode an image file (or PIL image) to a uint8 tensor [3, size, size]: EXIF rotation applied,
    any mode (grayscale, palette, RGBA, 16-bit, CMYK) made RGB (transparency over white), the
    shorter side resized to `size` and the centre cropped. max_pixels: refuse images that would
    still have more pixels than this after JPEG's reduced-scale decoding (a bound on memory and
    time for untrusted input). Raises ImageDecodeError naming the file (ImageTooLargeError when it
    has too many pixels)."""
    from PIL import Image, ImageOps
    name = getattr(source, "filename", None) or str(source)
    try:
        opened = None if isinstance(source, Image.Image) else Image.open(source)
        with opened or contextlib.nullcontext():
            img = opened or source
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the image is huge
            if max_pixels and img.size[0] * img.size[1] > max_pixels:
                raise ImageTooLargeError(f"image {Path(name).name} is {img.size[0]}x{img.size[1]} pixels, more "
                                         f"than the {max_pixels / 1e6:.0f} megapixels allowed: send a smaller one")
            img = ImageOps.exif_transpose(img)
            img = ImageOps.fit(_to_rgb(img), (size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as e:  # PIL's own limit, checked at open before ours
        raise ImageTooLargeError(f"image {Path(name).name} is too large: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"cannot decode image {name}: {e}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _to_rgb(img):
    from PIL import Image
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grayscale: PIL's convert() clips at 255, which turns most photos white.
        values = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        if img.mode == "F" and values.max() <= 1.0:
            peak = 1.0
        img = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _listing(path):
    """What a folder holds, for 'expected X, found Y' messages."""
    path = Path(path)
    if not path.exists():
        return "nothing (it does not exist)"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "") if entries else "an empty folder"


def _image_files(folder):
    return sorted(str(p) for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def find_tiny_imagenet(data_dir):
    """The tiny-imagenet-200 folder: data_dir itself or data_dir/tiny-imagenet-200."""
    for candidate in (Path(data_dir), Path(data_dir) / "tiny-imagenet-200"):
        if (candidate / "wnids.txt").is_file():
            return candidate
    return None


def download_tiny_imagenet(data_dir, url=TINY_IMAGENET_URL, md5=TINY_IMAGENET_MD5):
    """Fetch the official zip, check its md5, extract it under a temporary name, then rename, so an
    interrupted download or extraction never leaves a folder that looks complete. A no-op when
    the data is already there."""
    from torchvision.datasets.utils import download_and_extract_archive
    data_dir = Path(data_dir)
    target, partial = data_dir / "tiny-imagenet-200", data_dir / ".tiny-imagenet-200.partial"
    if find_tiny_imagenet(data_dir):
        return
    if target.exists():
        raise UserError(f"{target} exists but is incomplete (no wnids.txt): remove it and run again")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        download_and_extract_archive(url, str(data_dir), str(partial), target.name + ".zip", md5,
                                     remove_finished=True)
    except Exception as e:  # network errors come in many types; the message is what matters
        (data_dir / (target.name + ".zip")).unlink(missing_ok=True)  # partial, or not the md5's file
        raise UserError(f"downloading Tiny ImageNet from {url} failed ({e}): check the connection, and "
                        f"that the zip's md5 is {md5}, and retry") from None
    os.replace(partial / target.name, target)
    shutil.rmtree(partial)


def load_tiny_imagenet(data_dir, download=False):
    """Tiny ImageNet in its original layout. Class indices follow sorted wnids.txt for both
    splits; val labels come from val/val_annotations.txt (val/ is not in ImageFolder layout)."""
    if download:
        download_tiny_imagenet(data_dir)
    root = find_tiny_imagenet(data_dir)
    if root is None:
        raise UserError(f"no Tiny ImageNet in {data_dir}: expected tiny-imagenet-200/ with wnids.txt, "
                        f"words.txt, train/, val/; found {_listing(data_dir)}. Add --download to fetch it")
    wnids = sorted(line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip())
    index = {wnid: i for i, wnid in enumerate(wnids)}
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, names = line.partition("\t")
            words[wnid] = names.strip()
    class_names = [words.get(w, w).split(",")[0].strip() or w for w in wnids]

    train_files, train_labels = [], []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise UserError(f"Tiny ImageNet at {root} is incomplete: expected {folder}; "
                            f"found in train/: {_listing(root / 'train')}")
        files = _image_files(folder)
        train_files += files
        train_labels += [index[wnid]] * len(files)

    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"Tiny ImageNet at {root} has no val/val_annotations.txt "
                        f"(found in val/: {_listing(root / 'val')})")
    val_files, val_labels = [], []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in index:
            raise UserError(f"{annotations}: class {fields[1]} is not in wnids.txt")
        val_files.append(str(root / "val" / "images" / fields[0]))
        val_labels.append(index[fields[1]])
    return DatasetInfo("tiny", Split(train_labels, files=train_files), Split(val_labels, files=val_files),
                       class_names, wnids, IMAGENET_MEAN, IMAGENET_STD, source_size=64, root=str(root))


def load_image_folder(data_dir, image_size):
    """DIR/train/<class>/* and DIR/val/<class>/* (DIR/test/<class>/* when there is no val)."""
    root = Path(data_dir)
    train_dir = root / "train"
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise UserError(f"--dataset folder expected {root}/train/<class>/ and {root}/val/<class>/ "
                        f"(or test/); found {_listing(root)}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{train_dir} has no class folders: expected {train_dir}/<class>/<image>; "
                        f"found {_listing(train_dir)}")
    index = {c: i for i, c in enumerate(classes)}

    def read_split(split_dir):
        files, labels = [], []
        for c in sorted(p.name for p in split_dir.iterdir() if p.is_dir()):
            if c not in index:
                raise UserError(f"{split_dir}/{c} is a class that train/ does not have")
            found = _image_files(split_dir / c)
            files += found
            labels += [index[c]] * len(found)
        if not files:
            raise UserError(f"no images found in {split_dir}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})")
        return Split(labels, files=files)

    return DatasetInfo("folder", read_split(train_dir), read_split(val_dir), classes, classes,
                       IMAGENET_MEAN, IMAGENET_STD, source_size=image_size, root=str(root))


def load_cifar10(data_dir, download=False):
    """torchvision's CIFAR-10 (data_dir/cifar-10-batches-py, or that folder itself), kept at its
    native 32x32."""
    from torchvision.datasets import CIFAR10
    if Path(data_dir).name == "cifar-10-batches-py" and not download:
        data_dir = Path(data_dir).parent
    try:
        train = CIFAR10(str(data_dir), train=True, download=download)
        val = CIFAR10(str(data_dir), train=False, download=download)
    except RuntimeError as e:
        raise UserError(f"no CIFAR-10 in {data_dir} ({e}): expected {data_dir}/cifar-10-batches-py; "
                        f"found {_listing(data_dir)}. Add --download to fetch it") from None
    except OSError as e:
        raise UserError(f"downloading CIFAR-10 failed ({e}); check the connection and retry") from None
    return DatasetInfo("cifar10", Split(list(train.targets), arrays=train.data),
                       Split(list(val.targets), arrays=val.data), list(CIFAR10_CLASSES),
                       list(CIFAR10_CLASSES), CIFAR10_MEAN, CIFAR10_STD, source_size=32, root=str(data_dir))


def make_synthetic(image_size, num_classes=10, train_size=2048, val_size=512, seed=0):
    """Images whose label is learnable: each class is a smooth random colour pattern, each image
    that pattern shifted and overlaid with noise. For smoke tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=image_size,
                             mode="bilinear", align_corners=False)

    def split(n):
        labels = torch.randint(num_classes, (n,), generator=g)
        shifts = torch.randint(-image_size // 8, image_size // 8 + 1, (n,), generator=g)
        images = patterns[labels]
        images = torch.stack([torch.roll(im, int(s), dims=2) for im, s in zip(images, shifts)])
        images = (0.7 * images + 0.3 * torch.rand(images.shape, generator=g)).clamp(0, 1)
        arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return Split(labels.tolist(), arrays=arrays)

    names = [f"pattern {i}" for i in range(num_classes)]
    return DatasetInfo("synthetic", split(train_size), split(val_size), names, names,
                       (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), source_size=image_size)


def store_bytes(info, subset=0):
    """How much memory the uint8 stores of both splits will take, before decoding anything."""
    count = min(len(info.train), subset or len(info.train)) + min(len(info.val), subset or len(info.val))
    return count * 3 * info.source_size ** 2


def available_memory_bytes():
    """MemAvailable of this host (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_dataset(name, data_dir, image_size=64, download=False):
    """DatasetInfo for "tiny", "cifar10", "folder" or "synthetic" (no images decoded yet). data_dir
    may be the folder holding the dataset's folder or the dataset's folder itself."""
    if name == "tiny":
        info = load_tiny_imagenet(data_dir, download)
    elif name == "cifar10":
        info = load_cifar10(data_dir, download)
    elif name == "folder":
        info = load_image_folder(data_dir, image_size)
    elif name == "synthetic":
        info = make_synthetic(image_size)
    else:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if len(info.class_names) < 2:
        raise UserError(f"{data_dir} has {len(info.class_names)} class: a classifier needs at least 2 "
                        f"(one folder per class)")
    return info


def pick_examples(info, size, count=8):
    """Up to `count` validation images of different classes as {"images": uint8 [K, 3, size, size],
    "labels": [K]}: small enough to travel inside a checkpoint, so the demo can show examples
    without reading any path the checkpoint names."""
    picked, seen = [], set()
    for i, label in enumerate(info.val.labels):
        if label not in seen:
            seen.add(label)
            picked.append(i)
            if len(picked) == count:
                break
    images, labels = [], []
    for i in picked:
        source = info.val.files[i] if info.val.files is not None else _pil(info.val.arrays[i])
        try:
            images.append(decode_image(source, size))
            labels.append(info.val.labels[i])
        except ImageDecodeError:
            continue
    if not images:
        return None
    return {"images": torch.stack(images), "labels": labels}


# --- Fast path: decode once into a uint8 store, augment per batch on the training device ------

@dataclass
class ImageStore:
    """Decoded images [N, 3, S, S] uint8 and labels [N] int64, in host memory."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)


def _decode_for_store(job):
    path, size = job
    try:
        return decode_image(path, size).numpy(), None
    except ImageDecodeError as e:
        return None, str(e)


def _store_cache_path(cache_dir, dataset, split_name, split, size):
    # The key covers every file's path, size and mtime: any change to the source re-decodes.
    h = hashlib.sha256(f"v1 {dataset} {split_name} {size}".encode())
    for f in split.files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(json.dumps(split.labels).encode())
    return Path(cache_dir) / f"{dataset}-{split_name}-{size}px-{h.hexdigest()[:16]}.pt"


def _decode_split(split, size, workers, skip_bad_images, split_name, log, out=None):
    """Decode every image of a Split at size x size, each into the next row of `out` (uint8
    [N, 3, size, size]) when given: no list of decoded images beside it, so a store is never held
    twice. Returns the indices of the images that decoded; a bad one is an error, or with
    skip_bad_images left out, with one warning for all of them."""
    jobs = ((source, size) for source in (split.files if split.files is not None else map(_pil, split.arrays)))
    pool = None
    if workers > 1 and len(split) > 2000 and split.files is not None:
        # fork on Linux: the workers only run PIL, and a script without an `if __name__ ==
        # "__main__":` guard works (spawn would re-run that script in every worker and fail).
        # Elsewhere spawn is the safe choice, and such a script needs the guard.
        pool = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)
    results = pool.imap(_decode_for_store, jobs, chunksize=256) if pool else map(_decode_for_store, jobs)
    keep, errors = [], []
    with pool or contextlib.nullcontext():
        for i, (array, error) in enumerate(results):
            if error is not None:
                errors.append(error)
                continue
            if out is not None:
                out[len(keep)] = array
            keep.append(i)
    if errors and not skip_bad_images:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{errors[0]}{more}; remove it or pass --skip-bad-images")
    if errors:
        log(f"warning: skipped {len(errors)} undecodable images in {split_name}, e.g. {errors[0]}")
    return keep


def build_store(split, size, workers=0, cache_dir=None, skip_bad_images=False, dataset="data",
                split_name="train", log=print):
    """Decode a Split once into an ImageStore (uint8, size x size). With cache_dir, the store is
    saved there (atomically) and reused while the source files are unchanged."""
    labels = torch.tensor(split.labels, dtype=torch.int64)
    if split.arrays is not None and split.arrays.shape[1] == size:
        return ImageStore(torch.from_numpy(np.ascontiguousarray(split.arrays)).permute(0, 3, 1, 2).contiguous(),
                          labels)
    cache_path = _store_cache_path(cache_dir, dataset, split_name, split, size) \
        if cache_dir and split.files is not None else None
    if cache_path is not None and cache_path.is_file():
        try:
            cached = torch.load(cache_path, weights_only=True)
            log(f"{split_name}: {len(cached['labels'])} decoded images from cache {cache_path}")
            return ImageStore(cached["images"], cached["labels"])
        except Exception as e:  # a damaged cache is only a cache: decode again
            log(f"warning: ignoring unreadable cache {cache_path} ({e})")

    start = time.perf_counter()
    images = np.empty((len(split), 3, size, size), dtype=np.uint8)
    keep = _decode_split(split, size, workers, skip_bad_images, split_name, log, out=images)
    store = ImageStore(torch.from_numpy(images[:len(keep)]), labels[keep])
    seconds = time.perf_counter() - start
    log(f"{split_name}: decoded {len(store)} images to {size}x{size} in {seconds:.1f}s "
        f"({store.images.numel() / 2**20:.0f} MiB uint8)")
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"images": store.images, "labels": store.labels}, cache_path)
            log(f"{split_name}: cached at {cache_path}")
        except OSError as e:
            log(f"warning: could not write the cache {cache_path} ({e}); continuing without it")
    return store


def _pil(array):
    from PIL import Image
    return Image.fromarray(array)


def _resample_matrix(scale, offset, out_size, in_size):
    """[B, out, in] bilinear weights for x_in = scale * x_out + offset in [-1, 1] coordinates
    (pixel centres, like align_corners=False). Integer-pixel shifts reproduce pixels exactly."""
    out_pos = (torch.arange(out_size, device=scale.device, dtype=torch.float32) + 0.5) / out_size * 2 - 1
    src = scale[:, None] * out_pos[None, :] + offset[:, None]
    src_pixels = (src + 1) * (in_size / 2) - 0.5
    # Within half a pixel of the border is still inside the image: clamp there (as F.interpolate
    # does) so resizing does not darken the edges; farther out is padding and gets zero weight.
    inside = (src_pixels >= -0.5) & (src_pixels <= in_size - 0.5)
    src_pixels = torch.where(inside, src_pixels.clamp(0, in_size - 1), src_pixels)
    in_pixels = torch.arange(in_size, device=scale.device, dtype=torch.float32)
    return (1 - (src_pixels[:, :, None] - in_pixels[None, None, :]).abs()).clamp(min=0)


def _resample(images, params, out_size):
    """Crop/flip/resize a batch [B, 3, H, W] with per-image affine params [B, 4] = (sx, sy, tx, ty),
    as two batched matmuls: the same op on CPU, CUDA and XLA (TPUs are built for matmuls), fixed
    shapes. Returns floats in 0..255, [B, 3, out_size, out_size]."""
    b, c, h, w = images.shape
    rows = _resample_matrix(params[:, 1], params[:, 3], out_size, h)   # [B, out, H]
    cols = _resample_matrix(params[:, 0], params[:, 2], out_size, w)   # [B, out, W]
    # Channels ride along in the matmuls' free dimension: [B, out, H] @ [B, H, C*W], then columns.
    x = images.permute(0, 2, 1, 3).reshape(b, h, c * w).float()
    x = torch.bmm(rows, x).view(b, out_size * c, w)
    x = torch.bmm(x, cols.transpose(1, 2)).view(b, out_size, c, out_size)
    return x.permute(0, 2, 1, 3).contiguous()


def _shift_crop(images, params):
    """The "pad" crop: whole-pixel shifts (zero fill) and flips from params [B, 4], as one gather on
    the uint8 batch. Exactly what _resample computes for such params, at a fraction of the cost."""
    b, c, h, w = images.shape
    dx = torch.round(params[:, 2] * (w / 2)).long()
    dy = torch.round(params[:, 3] * (h / 2)).long()
    xs = torch.arange(w, device=images.device)
    cols = torch.where(params[:, :1] < 0, w - 1 - xs, xs) + dx[:, None]         # [B, W]
    rows = torch.arange(h, device=images.device)[None, :] + dy[:, None]          # [B, H]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    flat = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = images.reshape(b, c, h * w).gather(2, flat.view(b, 1, h * w).expand(b, c, h * w))
    return out.view(b, c, h, w) * valid[:, None]


@functools.lru_cache(maxsize=64)
def _device_constant(values, device):
    # Made once per device: torch.tensor(..., device="cuda") in the step would be a blocking
    # host->device copy every step.
    return torch.tensor(values, dtype=torch.float32).to(device)


def _normalize(x, mean, std):
    """0..255 floats -> (x / 255 - mean) / std."""
    mean = _device_constant(tuple(mean), x.device).view(1, 3, 1, 1)
    std = _device_constant(tuple(std), x.device).view(1, 3, 1, 1)
    return x * (1 / (255 * std)) - mean / std


def _resize(x, out_size):
    if x.shape[-1] == out_size and x.shape[-2] == out_size:
        return x.float()
    params = _device_constant((1.0, 1.0, 0.0, 0.0), x.device).expand(x.shape[0], 4)
    return _resample(x, params, out_size)


def train_transform(images, params, image_size, mean, std, crop="pad"):
    """On-device training augmentation of a uint8 batch [B, 3, S, S] with params from
    `random_crop_params`: crop, flip, resize to image_size, normalise. Returns float [B, 3, s, s]."""
    if crop == "pad":
        x = _resize(_shift_crop(images, params), image_size)
    else:
        x = _resample(images, params, image_size)
    return _normalize(x, mean, std)


def eval_transform(images, config):
    """What validation and inference do to a uint8 batch [N, 3, S, S] (S = config.source_size):
    resize to config.image_size and normalise with the dataset's mean/std."""
    return _normalize(_resize(images, config.image_size), config.mean, config.std)


def random_crop_params(generator, batch_size, source_size, crop="pad", min_scale=0.25, attempts=10):
    """Per-image (sx, sy, tx, ty) for `train_transform`, drawn on the host so that the data order
    and augmentation depend only on the seed and epoch, whatever the device.
    crop="pad": shift by up to source_size/8 whole pixels (zero padding) and flip.
    crop="resized": torchvision's RandomResizedCrop (area min_scale..1, aspect 3/4..4/3; a draw that
    does not fit is drawn again, up to `attempts` times, then the centre crop) and flip."""
    flip = torch.where(torch.rand(batch_size, generator=generator) < 0.5, -1.0, 1.0)
    if crop == "pad":
        pad = max(1, source_size // 8)
        shift = torch.randint(-pad, pad + 1, (batch_size, 2), generator=generator).float()
        return torch.stack([flip, torch.ones(batch_size), shift[:, 0] * 2 / source_size,
                            shift[:, 1] * 2 / source_size], 1)
    # All attempts drawn at once (fixed count, so the generator advances the same way every batch);
    # each image keeps its first draw that fits inside the (square) image.
    area = min_scale + (1 - min_scale) * torch.rand(batch_size, attempts, generator=generator)
    log_ratio = (torch.rand(batch_size, attempts, generator=generator) * 2 - 1) * math.log(4 / 3)
    sx, sy = torch.sqrt(area * torch.exp(log_ratio)), torch.sqrt(area / torch.exp(log_ratio))
    fits = (sx <= 1) & (sy <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), 0)
    pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
    none_fit = ~fits.any(1)
    sx = torch.where(none_fit, 1.0, pick(sx))  # fallback: the whole (square) image, as torchvision
    sy = torch.where(none_fit, 1.0, pick(sy))
    tx = (torch.rand(batch_size, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(batch_size, generator=generator) * 2 - 1) * (1 - sy)
    return torch.stack([sx * flip, sy, tx, ty], 1)


class StoreLoader:
    """Batches from an ImageStore, sharded over `world_size` replicas.

    Training batches are (uint8 images, labels, crop params), shuffled by (seed, epoch) into one
    permutation that the replicas split, each drawing its own crops and flips; the last partial
    batch is dropped so every step has the same shape (no XLA recompiles). Validation batches are
    (uint8 images, labels, mask): the last batch is padded to full size and the mask marks the
    real images, so metrics count every image exactly once across replicas. device: where the
    training step runs (CUDA): the epoch's order and crop parameters go there once per epoch, so
    no step waits on a host->device copy."""

    def __init__(self, store, batch_size, train, seed=0, rank=0, world_size=1, crop="pad",
                 source_size=None, device=None):
        self.store, self.batch_size, self.train = store, batch_size, train
        self.seed, self.rank, self.world_size, self.crop = seed, rank, world_size, crop
        self.source_size = source_size or store.images.shape[-1]
        self.device = device
        self.epoch = 0
        if train and len(store) // world_size < batch_size:
            raise UserError(f"{len(store)} training images make no full batch of {batch_size} per "
                            f"replica ({world_size}): lower --batch-size")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        if self.train:
            return len(self.store) // self.world_size // self.batch_size
        return math.ceil(math.ceil(len(self.store) / self.world_size) / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        images, labels = self.store.images, self.store.labels
        if self.train:
            order = torch.randperm(len(self.store), generator=g)
            per_replica = len(self.store) // self.world_size
            order = order[self.rank * per_replica:(self.rank + 1) * per_replica]
            if self.rank:  # one permutation for all, but crops and flips of each replica's own
                g.manual_seed(self.seed * 100_003 + self.epoch + 1_000_003 * self.rank)
            params = torch.stack([random_crop_params(g, self.batch_size, self.source_size, self.crop)
                                  for _ in range(len(self))])
            order, params = _to(order, images.device), _to(params, self.device)
            for b in range(len(self)):
                index = order[b * self.batch_size:(b + 1) * self.batch_size]
                yield _to(images[index], self.device), _to(labels[index], self.device), params[b]
        else:
            index = torch.arange(self.rank, len(self.store), self.world_size)
            for b in range(len(self)):
                chunk = index[b * self.batch_size:(b + 1) * self.batch_size]
                mask = torch.zeros(self.batch_size)
                mask[:len(chunk)] = 1
                padded = torch.cat([chunk, chunk.new_zeros(self.batch_size - len(chunk))])
                yield self.store.images[padded], self.store.labels[padded], mask


def _to(tensor, device):
    """tensor on `device` (None: where it is); host -> CUDA from pinned memory, asynchronously."""
    if device is None or tensor.device == torch.device(device):
        return tensor
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


# --- Baseline path: per-sample PIL decoding and torchvision transforms in DataLoader workers --

class PILDataset(torch.utils.data.Dataset):
    """Per-sample decoding (the plain torchvision way), for data too big for memory and as the
    baseline the fast path is measured against. Yields what the training step expects. Crops and
    resizes are torchvision's transforms on uint8 tensors without antialiasing, the same
    bilinear resampling the fast path and evaluation use."""

    def __init__(self, split, info, image_size, train, crop="pad"):
        from torchvision.transforms import v2 as T
        self.split, self.info, self.train, self.image_size = split, info, train, image_size
        s = info.source_size
        if crop == "pad":
            steps = [T.RandomCrop(s, padding=max(1, s // 8)), T.Resize(image_size, antialias=False)]
        else:
            steps = [T.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=False)]
        self.augment = T.Compose(steps + [T.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        source = self.split.files[i] if self.split.files is not None else _pil(self.split.arrays[i])
        try:
            image = decode_image(source, self.info.source_size)
        except ImageDecodeError as e:  # --skip-bad-images has dropped them from the split already
            raise UserError(f"{e}; remove it or pass --skip-bad-images") from None
        if self.train:
            image = self.augment(image)
        else:
            image = _resize(image[None], self.image_size)[0]
        x = _normalize(image[None].float(), self.info.mean, self.info.std)[0]
        return x, self.split.labels[i], torch.zeros(4) if self.train else torch.tensor(1.0)


def make_loaders(info, batch_size, image_size, loader="fast", crop="pad", workers=0, subset=0,
                 seed=0, cache_dir=None, skip_bad_images=False, rank=0, world_size=1, log=print,
                 need_train=True, store_device=None, device=None):
    """(train_loader, val_loader) for a DatasetInfo, sharded for replica `rank` of `world_size`.
    loader="fast": decode once into a uint8 store, augment per batch on the training device
    (`train_transform`); loader="torch": a per-sample PIL DataLoader with `workers` processes.
    subset: about that many images of each split, from every class. train_loader is None when
    need_train is False (evaluation only). store_device: where the uint8 stores live (default:
    host memory; a GPU when they fit there, so batches never cross the PCIe bus). device: the
    CUDA device the fast path's training batches go to."""
    train_split, val_split = info.train.subset(subset, seed), info.val.subset(subset, seed)
    if loader == "torch":
        if skip_bad_images and info.train.files is not None:
            # Dropped before training, as a batch has no place for a missing image. Checked at a
            # small size: JPEGs then decode at a reduced scale, which still reads every byte.
            if need_train:
                train_split = train_split.take(_decode_split(train_split, 16, workers, True, "train", log))
            val_split = val_split.take(_decode_split(val_split, 16, workers, True, "val", log))
        common = dict(batch_size=batch_size, num_workers=workers,
                      multiprocessing_context="spawn" if workers else None)
        # DistributedSampler: equal shards (drop_last), reshuffled per epoch from (seed, epoch) by
        # set_epoch. Workers are not persistent: they restart each epoch and take their seeds from
        # the global RNG, which the loop reseeds from (seed, epoch), so a resume draws the same batches.
        dataset = PILDataset(train_split, info, image_size, True, crop)
        sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed,
                                                      drop_last=True)
        train = torch.utils.data.DataLoader(dataset, sampler=sampler, drop_last=True, **common) \
            if need_train else None
        val = torch.utils.data.DataLoader(
            torch.utils.data.Subset(PILDataset(val_split, info, image_size, False, crop),
                                    list(range(rank, len(val_split), world_size))),
            shuffle=False, persistent_workers=workers > 0, **common)
        if need_train and len(train) == 0:
            raise UserError(f"{len(train_split)} training images make no full batch of {batch_size} per "
                            f"replica ({world_size}): lower --batch-size")
        return train, val

    def store(name, split):
        built = build_store(split, info.source_size, workers, cache_dir, skip_bad_images, info.name, name, log)
        if store_device is not None:
            built = ImageStore(built.images.to(store_device), built.labels.to(store_device))
        return built
    train = (StoreLoader(store("train", train_split), batch_size, True, seed, rank, world_size, crop,
                         device=device) if need_train else None)
    return train, StoreLoader(store("val", val_split), batch_size, False, seed, rank, world_size)


# ---------------------------------------------------------------------------------------------
# Device: where training runs (CUDA, XLA, CPU), precision, and how processes talk (DDP, XLA)
# ---------------------------------------------------------------------------------------------

@dataclass
class Device:
    """Where training runs. kind: "cuda", "xla" or "cpu". With several processes, rank/world_size
    say which shard is ours; `distributed` says how processes talk: "ddp" (a torch.distributed
    process group, as torchrun sets up) or "xla" (torch_xla's collectives between TPU cores)."""
    kind: str
    torch_device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: str | None = None
    note: str = ""  # said in the device line, e.g. why XLA runs on the CPU

    @property
    def is_master(self):
        return self.rank == 0


def xla_available():
    """torch_xla importable and a PJRT device configured (PJRT_DEVICE) or a TPU present. /dev/vfio
    is no sign of a TPU: many hosts without one have it."""
    try:
        import importlib.util
        if importlib.util.find_spec("torch_xla") is None:
            return False
    except (ImportError, ValueError):
        return False
    return bool(os.environ.get("PJRT_DEVICE")) or Path("/dev/accel0").exists()


def resolve_device_kind(requested):
    """"auto" -> "cuda" if available, else "xla" if usable, else "cpu"; checks explicit requests."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "xla" if xla_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if requested == "xla":
        try:
            import torch_xla  # noqa: F401
        except ImportError:
            raise UserError("--device xla needs torch_xla: pip install 'torch_xla[tpu]==2.9.0' "
                            "(matching torch 2.9.x), then set PJRT_DEVICE=TPU (or CPU)") from None
    if requested not in ("cuda", "xla", "cpu"):
        raise UserError(f"unknown device {requested!r}: choose auto, cuda, xla or cpu")
    return requested


def launched_by_torchrun():
    """True inside a process that torchrun (or another launcher with its variables) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def make_device(kind):
    """The Device for a resolved kind, inside the process that will use it. Under torchrun this
    joins the process group (nccl on CUDA, gloo on the CPU) from the standard variables, each rank
    on its own local GPU."""
    import torch.distributed as dist
    if kind == "xla":
        import torch_xla
        import torch_xla.runtime as xr
        on_cpu = os.environ.get("PJRT_DEVICE", "").upper() == "CPU"
        note = "on the CPU: PJRT_DEVICE=CPU" if on_cpu else ""
        world = xr.world_size()
        return Device("xla", torch_xla.device(), xr.global_ordinal(), world,
                      "xla" if world > 1 else None, note)
    if kind == "cuda":  # fastest convolution algorithms for the fixed shapes; TF32 for fp32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    if launched_by_torchrun():
        local_rank = int(os.environ["LOCAL_RANK"])
        if kind == "cuda":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        torch_device = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
        return Device(kind, torch_device, dist.get_rank(), dist.get_world_size(), "ddp")
    return Device(kind, torch.device("cuda" if kind == "cuda" else "cpu"))


def cpu_has_native_bf16():
    """avx512_bf16 or AMX on x86, or bf16 on Arm: where bfloat16 matmuls run at full speed."""
    cpu = getattr(torch._C, "_cpu", None)
    if cpu is not None and (getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                            or getattr(cpu, "_is_amx_tile_supported", lambda: False)()):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def resolve_precision(precision, device):
    """"auto" -> "bf16" where the hardware runs it natively (CUDA compute capability 8.0+, TPUs,
    CPUs with avx512_bf16 or AMX), "fp16" on older CUDA GPUs (T4, V100: fp16 tensor cores; their
    bf16 is emulated), else "fp32"."""
    if precision != "auto":
        return precision
    if device.kind == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device.torch_device) >= (8, 0) else "fp16"
    if device.kind == "xla":
        return "fp32" if device.note.startswith("on the CPU") else "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def seed_everything(seed, device):
    """Seed every RNG the step uses. Called at each epoch start with (seed, epoch), so a resumed
    run draws exactly the numbers an uninterrupted one would. Replicas get different dropout masks
    (seed + rank) but the same weights, which are initialised before this on the CPU."""
    seed = seed + 7919 * device.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.kind == "xla":  # torch.manual_seed does not reach the XLA generator
        import torch_xla.core.xla_model as xm
        xm.set_rng_state(seed, device=device.torch_device)


def device_batches(loader, device):
    """Iterate a loader's batches on the device. On XLA, MpDeviceLoader overlaps the host->device
    copy with compute and cuts the graph after every step."""
    if device.kind == "xla":
        import torch_xla.distributed.parallel_loader as pl
        yield from pl.MpDeviceLoader(loader, device.torch_device)
        return
    non_blocking = device.kind == "cuda"
    for batch in loader:
        yield tuple(t.to(device.torch_device, non_blocking=non_blocking) for t in batch)


def zeros_on(device, n):
    # Built on the host and copied: on XLA a device-side torch.zeros is a graph of its own that
    # gets compiled again whenever it is not fused into the same neighbours.
    return torch.zeros(n).to(device.torch_device)


def all_reduce_sum(tensor, device):
    """Sum a metrics tensor over processes (a no-op on one)."""
    if device.world_size == 1:
        return tensor
    if device.distributed == "xla":
        import torch_xla.core.xla_model as xm
        return xm.all_reduce(xm.REDUCE_SUM, tensor)
    import torch.distributed as dist
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def first_on_each_node(device, fn):
    """fn(True) on this node's first process, then fn(False) on the others once it has finished: a
    download into files that every process would otherwise write and delete at once. A UserError
    there stops every process, not only the first."""
    if device.distributed != "ddp":
        return fn(True)
    first, error, result = int(os.environ.get("LOCAL_RANK", 0)) == 0, None, None
    if first:
        try:
            result = fn(True)
        except UserError as e:
            error = e
    # An all_reduce, not a barrier: it also tells the waiting processes whether the first succeeded.
    if all_reduce_sum(zeros_on(device, 1) + (error is not None), device).item():
        error = error or UserError("the first process of a node failed to prepare the data: see its message")
        error.everywhere = True
        raise error
    return result if first else fn(False)


def everyones(value, device):
    """Every process's value of a scalar tensor, as a list on every process."""
    if device.world_size == 1:
        return [value.item()]
    mine = F.one_hot(torch.tensor(device.rank), device.world_size).to(value.dtype).to(device.torch_device)
    return all_reduce_sum(mine * value, device).tolist()


def optimizer_step(optimizer, device, scaler):
    """Step; on several TPU cores xm.optimizer_step all-reduces the gradients first (DDP has
    already averaged them during backward). The scaler (fp16 only; a no-op otherwise) unscales
    the gradients and skips a step whose gradients overflowed."""
    if device.kind == "xla":
        import torch_xla.core.xla_model as xm
        xm.optimizer_step(optimizer)
        return
    scaler.step(optimizer)
    scaler.update()


def average_buffers(model, device):
    """Average the BatchNorm running statistics over processes: each replica's drift apart by its
    own last batches, and what is validated must be what rank 0 saves."""
    if device.world_size > 1:
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.copy_(all_reduce_sum(buffer, device) / device.world_size)


def replica_checksums(model, device):
    """Every process's sum of |weights| (a list on all ranks): equal values show the processes
    train one model."""
    return everyones(torch.stack([p.detach().abs().sum().double() for p in model.parameters()]).sum(), device)


def xla_compile_count():
    """How many graphs torch_xla has compiled in this process (None when XLA is not in use)."""
    if "torch_xla" not in sys.modules:
        return None
    import torch_xla.debug.metrics as met
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


# ---------------------------------------------------------------------------------------------
# Train / evaluate: the recipe (TrainConfig), the step, the epoch loop, evaluation, prediction
# ---------------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "paper")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    """The training recipe. The defaults are the modern one: SGD with Nesterov momentum, the peak
    learning rate given per 256 images and scaled to the global batch, a per-step linear warmup
    then cosine decay to zero at the last step, label smoothing 0.1, weight decay on conv and FC
    weights only (not on BatchNorm or biases). schedule="paper" is the paper's: warmup, then
    x0.96 every 8 epochs."""
    epochs: int = 30
    batch_size: int = 128             # per device / process; the global batch is this x processes
    lr: float = 0.2                   # peak learning rate per 256 images of the global batch
    schedule: str = "cosine"          # "cosine" or "paper"
    warmup_epochs: float = 2.0        # linear from 0 to the peak, per step (at most epochs / 4)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    aux_weight: float = 0.3           # loss = main + aux_weight x (aux1 + aux2)
    crop: str = "pad"                 # "pad" (shift + flip) or "resized" (random-resized + flip)
    precision: str = "auto"           # "auto": bf16 where the hardware runs it, fp16 on older GPUs, else fp32
    channels_last: bool | None = None  # None: on CUDA and CPU, off on XLA
    compile: bool | str = False       # torch.compile the training step (a string: its backend)
    tta: bool = False                 # validation: average the logits of each image and its mirror
    seed: int = 0
    log_interval: int = 50            # steps between progress lines, and every ~30 s (0: only per epoch)
    save_every: float = 0.0           # minutes between mid-epoch checkpoints in last.pt (0: epoch ends only)

    def check(self):
        """Raise ValueError naming the first field that makes no sense."""
        rules = [("epochs", self.epochs >= 1, "at least 1"), ("batch_size", self.batch_size >= 1, "at least 1"),
                 ("lr", self.lr > 0, "above 0"), ("warmup_epochs", self.warmup_epochs >= 0, "0 or more"),
                 ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                 ("weight_decay", self.weight_decay >= 0, "0 or more"),
                 ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                 ("aux_weight", self.aux_weight >= 0, "0 or more"), ("log_interval", self.log_interval >= 0, "0 or more"),
                 ("save_every", self.save_every >= 0, "0 or more"),
                 ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
                 ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
                 ("crop", self.crop in ("pad", "resized"), "pad or resized")]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        return self


def peak_lr(config, world_size=1):
    """The learning rate at the end of warmup: config.lr per 256 images x the global batch."""
    return config.lr * config.batch_size * world_size / 256


def learning_rate(config, epoch, step, steps_per_epoch, world_size=1):
    """The learning rate of step `step` (0-based) of epoch `epoch`: a pure function of where the
    run is, so a resumed run (on any number of processes) continues the schedule exactly."""
    progress = epoch + step / steps_per_epoch  # in epochs
    peak = peak_lr(config, world_size)
    warmup = min(config.warmup_epochs, config.epochs / 4)  # a short run still gets to decay
    if warmup and progress < warmup:
        return peak * min(1.0, (progress + 1 / steps_per_epoch) / warmup)
    if config.schedule == "paper":  # Szegedy et al.: -4% every 8 epochs
        return peak * 0.96 ** (epoch // 8)
    # Measured at the step's start, so the last step's rate is small but never 0 (on XLA a 0 or 1
    # becomes a constant in the graph and would compile one more graph).
    done = min((progress - warmup) / max(config.epochs - warmup, 1e-9), 1.0)
    return peak * 0.5 * (1 + math.cos(math.pi * done))


def make_optimizer(model, config, device_kind="cpu"):
    """SGD (Nesterov by default) with weight decay on conv and FC weights only: decaying BatchNorm
    scales and biases only fights the normalisation. The fused (CUDA) or foreach (CPU) kernels."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    kernels = {"cuda": {"fused": True}, "cpu": {"foreach": True}}.get(device_kind, {})
    return torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=0.0, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
                           **kernels)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


GoogLeNetLoss = namedtuple("GoogLeNetLoss", ["total", "main", "aux", "logits"])
GoogLeNetLoss.__doc__ = """total: what training minimises (label smoothing, aux heads weighted in);
main / aux: plain cross-entropy of the main head and the mean of the aux heads, detached, for logs
(main is comparable to the validation loss); logits: the main head's."""


def googlenet_loss(outputs, labels, aux_weight=0.3, label_smoothing=0.0):
    """Cross-entropy of the main logits plus aux_weight x each aux head's (aux only in training)."""
    if isinstance(outputs, GoogLeNetOutputs):
        logits, auxes = outputs.logits, (outputs.aux1, outputs.aux2)
    else:
        logits, auxes = outputs, ()
    total = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    for aux in auxes:
        total = total + aux_weight * F.cross_entropy(aux, labels, label_smoothing=label_smoothing)
    with torch.no_grad():
        main = F.cross_entropy(logits.float(), labels)
        aux = (sum(F.cross_entropy(a.float(), labels) for a in auxes) / len(auxes) if auxes
               else torch.zeros_like(main))
    return GoogLeNetLoss(total, main, aux, logits)


def _autocast(device, precision):
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.kind, dtype=dtype, enabled=precision != "fp32")


def make_grad_scaler(precision, device):
    """fp16 needs loss scaling (its gradients underflow); a step whose gradients overflow is
    skipped and the scale lowered, which is how the scaler settles, not a divergence."""
    return torch.amp.GradScaler(device.kind, enabled=precision == "fp16")


def uses_channels_last(config, device):
    """config.channels_last, or by default: on for CUDA and CPU, off on XLA."""
    return config.channels_last if config.channels_last is not None else device.kind != "xla"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""
    everywhere = True  # the processes decide together (train_one_epoch), or share the weights (train)


def train_step(step_model, optimizer, scaler, batch, sums, model_config, config, device, precision,
               channels_last):
    """One optimizer step on a batch (images, labels, crop params), adding (main loss x n, aux
    loss x n, correct, n, first bad step) to the device tensor `sums`. Nothing here reads a value
    back to the host, so on an accelerator the host runs ahead of the device."""
    images, labels, crop_params = batch
    if images.dtype == torch.uint8:  # fast path: augment here, on the device
        images = train_transform(images, crop_params, model_config.image_size, model_config.mean,
                                 model_config.std, config.crop)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        outputs = step_model(images)
        loss = googlenet_loss(outputs, labels, config.aux_weight, config.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss.total).backward()
    optimizer_step(optimizer, device, scaler)
    n = labels.shape[0]
    # The step number from the device's own count (a Python `step` would be a new constant
    # in XLA's graph at step 1 of every epoch: one more compilation in epoch 2).
    bad = (~torch.isfinite(loss.total.detach())).float() * (sums[3] / n + 1) * (sums[4] == 0)
    sums += torch.stack([loss.main * n, loss.aux * n, (loss.logits.argmax(1) == labels).sum().float(),
                         labels.new_full((), n, dtype=torch.float32), bad])


class Stopped(UserError):
    """SIGTERM or Ctrl-C: the run stopped after a step and saved where it was."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


STOP = {"signal": None}  # set by the SIGTERM / first Ctrl-C handler that train() installs


@contextlib.contextmanager
def _graceful_stop():
    """SIGTERM (a preemption's warning) and a first Ctrl-C set STOP instead of killing the process:
    the epoch loop then saves its position after the step in progress and raises Stopped."""
    STOP["signal"] = None
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _crash_point(written, epoch):
    # For the crash tests: GOOGLENET_KILL_AFTER=last.pt:3 kills the run right after epoch 3's last.pt.
    if os.environ.get("GOOGLENET_KILL_AFTER") == f"{written}:{epoch + 1}":
        os.kill(os.getpid(), signal.SIGKILL)


def _request_stop(signum, frame):
    if signum == signal.SIGINT and STOP["signal"] is not None:
        raise KeyboardInterrupt  # a second Ctrl-C: quit now
    STOP["signal"] = signum


def train_one_epoch(model, loader, optimizer, device, model_config, config, epoch, log=print,
                    step_model=None, announce_first_step=False, scaler=None, position=None,
                    save_position=None, save_every=0.0):
    """One pass over the training loader at the learning rates `learning_rate` gives. Metrics
    accumulate on the device and are read once per log interval (every step on the CPU, where a
    read costs nothing; once per epoch with log_interval 0). Raises TrainingDiverged at the first
    non-finite loss found. step_model: what runs forward/backward (a DDP or compiled wrapper of
    model); default model. announce_first_step: say that the first step compiles (XLA,
    torch.compile) and how long it took. scaler: the fp16 GradScaler (make_grad_scaler).
    position: where a stopped epoch was saved ({"step", "sums", "seconds", "rng"}): continue
    from there. save_position(position): called after a step when a stop was requested (SIGTERM,
    Ctrl-C: then Stopped is raised) or every save_every seconds (0: never).
    Returns {"loss", "aux_loss", "top1", "images", "seconds"}."""
    step_model = model if step_model is None else step_model  # a compiled module refuses bool()
    model.train()
    precision = resolve_precision(config.precision, device)
    scaler = scaler or make_grad_scaler(precision, device)
    channels_last = uses_channels_last(config, device)
    sums = zeros_on(device, 5)  # main loss x n, aux loss x n, correct, n, first bad step (0 = none)
    first = position["step"] if position else 0
    if position:
        sums += torch.tensor(position["sums"]).to(sums.device)
    steps, start = len(loader), time.perf_counter() - (position["seconds"] if position else 0)
    check_every = 1 if device.kind == "cpu" else config.log_interval or steps
    last_log = last_save = time.perf_counter() - 10  # the first progress line after ~20 s
    if announce_first_step:
        log(f"compiling the first training step ({'torch.compile' if config.compile else 'XLA'}; one-off, "
            f"can take minutes)")
    for step, batch in enumerate(itertools.islice(device_batches(loader, device), first, None), first + 1):
        if position and step == first + 1:  # after the loader drew its seeds: dropout goes on as it was
            torch.set_rng_state(position["rng"])
            if position.get("cuda_rng") is not None and device.kind == "cuda":
                torch.cuda.set_rng_state(position["cuda_rng"], device.torch_device)
        if announce_first_step and step == 2:
            # The loader hands out batch 2 once step 1's graph is compiled and launched: no extra
            # sync (one here would cut the first epoch's graphs differently from the others').
            log(f"first step compiled in {time.perf_counter() - start:.1f}s")
        set_lr(optimizer, learning_rate(config, epoch, step - 1, steps, device.world_size))
        train_step(step_model, optimizer, scaler, batch, sums, model_config, config, device, precision,
                   channels_last)
        now, check = time.perf_counter(), step % check_every == 0 or step == steps
        on_time = config.log_interval and now - last_log >= 30 and (check or device.world_size == 1)
        if check or on_time:
            values = sums.tolist()  # the one host read per interval
            if device.world_size > 1:  # stop together: one that went on would wait forever in a collective
                values[4] = min((s for s in everyones(sums[4], device) if s), default=0)
            if values[4]:
                raise TrainingDiverged(
                    f"the loss became non-finite at step {int(values[4])} of epoch {epoch + 1}: "
                    f"lower --lr (now {config.lr} per 256 images) or use --precision fp32; "
                    f"checkpoints of earlier epochs are kept")
            if config.log_interval and (step % config.log_interval == 0 or on_time):
                last_log = now
                main, aux, correct, count, _ = values
                elapsed = time.perf_counter() - start
                rate = count * device.world_size / elapsed
                log(f"epoch {epoch + 1} step {step}/{steps} loss {main / count:.4f} aux {aux / count:.4f} "
                    f"top1 {correct / count:.4f} lr {optimizer.param_groups[0]['lr']:.4g} {rate:.0f} img/s "
                    f"| {_clock(elapsed)} elapsed, ETA epoch {_clock(elapsed / step * (steps - step))} "
                    f"run {_clock(elapsed / step * (steps - step + steps * (config.epochs - epoch - 1)))}")
        if save_position is not None and step < steps:
            stop, save = STOP["signal"] is not None, bool(save_every) and now - last_save >= save_every
            if device.world_size > 1 and check:  # every replica stops at the same step
                stop, save = (bool(v) for v in all_reduce_sum(
                    torch.tensor([float(stop), float(save)]).to(device.torch_device), device).tolist())
            elif device.world_size > 1:
                stop = save = False
            if stop or save:
                last_save = now
                save_position({"step": step, "sums": sums.tolist(), "seconds": now - start,
                               "rng": torch.get_rng_state(),
                               "cuda_rng": torch.cuda.get_rng_state(device.torch_device)
                               if device.kind == "cuda" else None}, stop)
    seconds = time.perf_counter() - start
    main, aux, correct, count, _ = all_reduce_sum(sums, device).tolist()
    count = max(count, 1)
    return {"loss": main / count, "aux_loss": aux / count, "top1": correct / count, "images": int(count),
            "seconds": seconds}


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


@torch.no_grad()
def evaluate(model, loader, device, model_config, precision="fp32", log=None, log_interval=0, tta=False):
    """Loss, top-1 and top-5 over the whole validation set (padded batches masked, processes
    reduced): {"loss", "top1", "top5", "images"}. With log and log_interval, a progress line every
    log_interval steps. tta: score each image by the mean logits of it and its left-right mirror
    (training flips too, so both views are in-distribution; costs a second forward pass)."""
    model.eval()
    precision = resolve_precision(precision, device)
    channels_last = device.kind != "xla" and next(model.parameters()).is_contiguous(
        memory_format=torch.channels_last) and next(model.parameters()).ndim == 4
    sums = zeros_on(device, 4)  # loss, top1, top5, n
    start = time.perf_counter()
    for step, (images, labels, mask) in enumerate(device_batches(loader, device), 1):
        if log is not None and log_interval and step % log_interval == 0:
            elapsed = time.perf_counter() - start
            log(f"validation step {step}/{len(loader)} | {_clock(elapsed)} elapsed, ETA "
                f"{_clock(elapsed / step * (len(loader) - step))}")
        if images.dtype == torch.uint8:
            images = eval_transform(images, model_config)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, precision):
            logits = model(images).float()
            if tta:
                logits = (logits + model(images.flip(3)).float()) / 2
        loss = F.cross_entropy(logits, labels, reduction="none")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit5 = (top5 == labels[:, None]).any(1).float()
        hit1 = (top5[:, 0] == labels).float()
        mask = mask.float()
        sums += torch.stack([(loss * mask).sum(), (hit1 * mask).sum(), (hit5 * mask).sum(), mask.sum()])
    loss_sum, top1, top5, count = all_reduce_sum(sums, device).tolist()
    count = max(count, 1)
    return {"loss": loss_sum / count, "top1": top1 / count, "top5": top5 / count, "images": int(count)}


def train(model, train_loader, val_loader, model_config, config, device=None, checkpoint_dir=None,
          resume=None, examples=None, cli_args=None, log=print):
    """Train `model` to config.epochs epochs, evaluating after each; returns the history (one dict
    of metrics per epoch, the same lines metrics.jsonl holds).

    train_loader / val_loader: from make_loaders. model_config: the ModelConfig a checkpoint will
    carry (image size, normalisation, classes). device: a Device (default: the best one here).
    checkpoint_dir: where the master process writes last.pt every epoch, best.pt when val top-1
    improves and metrics.jsonl (None: nothing is written). resume: a checkpoint from
    load_checkpoint whose weights `model` already holds; the run continues its epoch count,
    optimizer, schedule and history. examples: small uint8 images stored in the checkpoints for
    the demo (see pick_examples). Raises TrainingDiverged on a non-finite loss, before any
    checkpoint of that epoch is written. On SIGTERM or a first Ctrl-C the step in progress ends,
    last.pt records the position in the epoch (a resume continues from that step) and Stopped is
    raised."""
    config.check()
    device = device or make_device(resolve_device_kind("auto"))
    run_start = time.perf_counter()
    channels_last = uses_channels_last(config, device)
    model.to(device.torch_device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = model
    if device.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        step_model = DistributedDataParallel(model, device_ids=[device.torch_device.index]
                                             if device.kind == "cuda" else None)
    if config.compile:  # model keeps the weights: no _orig_mod. keys in checkpoints
        step_model = torch.compile(step_model, **({"backend": config.compile} if isinstance(config.compile, str) else {}))
    optimizer = make_optimizer(model, config, device.kind)
    scaler = make_grad_scaler(resolve_precision(config.precision, device), device)
    start_epoch, history = 0, []
    if resume is not None:
        try:
            optimizer.load_state_dict(resume["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({e}): "
                                  f"it was written by another version of googlenet.py") from None
        for group, decay in zip(optimizer.param_groups, (config.weight_decay, 0.0)):
            # The restored state carries the old values; today's config wins (same values: no change).
            group.update(momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
                         weight_decay=decay)
        if resume.get("scaler") and scaler.is_enabled():  # fp16: continue the loss scale where it was
            scaler.load_state_dict(resume["scaler"])
        start_epoch = resume["config"]["epoch"]
        history = [h for h in resume.get("history") or [] if h.get("epoch", 0) <= start_epoch]
    position = (resume or {}).get("position")
    position = position if position and position.get("epoch") == start_epoch else None
    model_config.run_id = model_config.run_id or os.urandom(8).hex()
    out_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if out_dir is not None and device.is_master:
        out_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temporaries(out_dir)
        if removed:
            log(f"removed {removed} temporary file{'s' * (removed > 1)} of interrupted saves in {out_dir}")
        if history:  # a kill after last.pt but before metrics.jsonl: rewrite it from the checkpoint
            write_metrics(out_dir / "metrics.jsonl", history)
    best = max(history, key=lambda h: h["val_top1"], default=None)
    if start_epoch >= config.epochs:
        log(f"already trained {start_epoch} epochs: pass --epochs N (> {start_epoch}) to train longer")

    def save(path, **extra):
        model_config.best_top1, model_config.best_epoch = (best["val_top1"], best["epoch"]) if best else (None, None)
        save_checkpoint(path, model=model, optimizer=optimizer, config=model_config, train_config=config,
                        history=history, examples=examples, cli_args=cli_args, scaler=scaler, **extra)

    def save_position(where, stop):  # mid-epoch: last.pt with the position; history and best.pt as they are
        if out_dir is not None and device.is_master:
            model_config.epoch = epoch
            save(out_dir / "last.pt", position={"epoch": epoch, **where})
        if stop:
            if device.distributed == "ddp":
                import torch.distributed as dist
                dist.barrier()  # the others wait until rank 0 has written last.pt
            signum = STOP["signal"] or signal.SIGTERM  # (another replica got it)
            raise Stopped(f"stopped by {signal.Signals(signum).name} after step {where['step']} of epoch "
                          f"{epoch + 1}" + (f": saved in {out_dir / 'last.pt'}; continue with --resume"
                                            if out_dir is not None else ""), signum)
        log(f"saved the position (epoch {epoch + 1} step {where['step']}) in {out_dir / 'last.pt'}")

    with _graceful_stop():
        for epoch in range(start_epoch, config.epochs):
            seed_everything(config.seed * 1000 + epoch, device)
            for has_epochs in (train_loader, getattr(train_loader, "sampler", None)):
                if hasattr(has_epochs, "set_epoch"):  # StoreLoader, DistributedSampler
                    has_epochs.set_epoch(epoch)
            lr = learning_rate(config, epoch, 0, len(train_loader), device.world_size)
            result = train_one_epoch(model, train_loader, optimizer, device, model_config, config, epoch, log,
                                     step_model, announce_first_step=epoch == start_epoch and (
                                         bool(config.compile) or device.kind == "xla"), scaler=scaler,
                                     position=position if epoch == start_epoch else None,
                                     save_position=save_position, save_every=config.save_every * 60)
            average_buffers(model, device)  # validate the BatchNorm statistics that are saved
            val = evaluate(model, val_loader, device, model_config, config.precision, log, config.log_interval,
                           config.tta)
            if not torch.isfinite(torch.stack([p.detach().float().sum() for p in model.parameters()])).all():
                # The last step's update can break the weights after a finite loss: never save those.
                raise TrainingDiverged(f"the weights became non-finite in epoch {epoch + 1}: lower --lr (now "
                                       f"{config.lr} per 256 images) or use --precision fp32; checkpoints of "
                                       f"earlier epochs are kept")
            record = {"epoch": epoch + 1, "train_loss": result["loss"], "train_aux_loss": result["aux_loss"],
                      "train_top1": result["top1"], "val_loss": val["loss"], "val_top1": val["top1"],
                      "val_top5": val["top5"], "val_images": val["images"], "val_tta": config.tta,
                      "train_images": result["images"],
                      "lr": lr, "epoch_seconds": result["seconds"],
                      "train_images_per_second": result["images"] / max(result["seconds"], 1e-9),
                      "elapsed_seconds": time.perf_counter() - run_start}
            if device.world_size > 1:
                record["processes"] = device.world_size
                record["replica_weight_checksums"] = replica_checksums(model, device)
            compiles = xla_compile_count()
            if compiles is not None:
                record["xla_compiles"] = compiles
            history.append(record)
            improved = best is None or val["top1"] > best["val_top1"]
            best = record if improved else best
            left = (config.epochs - epoch - 1) * (time.perf_counter() - run_start) / (epoch + 1 - start_epoch)
            log(f"epoch {epoch + 1}/{config.epochs} train loss {result['loss']:.4f} (aux {result['aux_loss']:.4f}) "
                f"top1 {result['top1']:.4f} | val loss {val['loss']:.4f} top1 {val['top1']:.4f} top5 {val['top5']:.4f} "
                f"{'(flip TTA) ' if config.tta else ''}| lr {lr:.4g} | {result['seconds']:.1f}s "
                f"{record['train_images_per_second']:.0f} img/s | run ETA {_clock(left)}")
            if out_dir is not None and device.is_master:
                model_config.epoch, model_config.val_top1 = epoch + 1, val["top1"]
                # best.pt first: a crash between the two writes then never loses the best epoch;
                # metrics.jsonl last, rewritten whole from the history, so it holds each epoch once
                # (and rewritten at the next start, should a kill land before it).
                if improved:
                    save(out_dir / "best.pt")
                    _crash_point("best.pt", epoch)
                    atomic_copy(out_dir / "best.pt", out_dir / "last.pt")
                else:
                    save(out_dir / "last.pt")
                _crash_point("last.pt", epoch)
                write_metrics(out_dir / "metrics.jsonl", history)
                _crash_point("metrics.jsonl", epoch)
    if history and device.is_master:
        log(f"done in {_clock(time.perf_counter() - run_start)}: best val top1 {best['val_top1']:.4f} "
            f"top5 {best['val_top5']:.4f} at epoch {best['epoch']}"
            + (f"; {out_dir / 'last.pt'}, {out_dir / 'best.pt'}, {out_dir / 'metrics.jsonl'}" if out_dir else ""))
    return history


def write_metrics(path, history):
    """metrics.jsonl: one JSON line per epoch, rewritten atomically."""
    _atomic_write(path, lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()))


@torch.no_grad()
def predict_proba(model, config, images):
    """Class probabilities [N, num_classes] for a uint8 batch [N, 3, S, S] decoded with
    decode_image(..., config.source_size), preprocessed exactly as validation does."""
    model.eval()
    device = next(model.parameters()).device
    logits = model(eval_transform(images.to(device), config))
    return logits.float().softmax(1).cpu()


# ---------------------------------------------------------------------------------------------
# Checkpoint: atomic writes, self-describing files, and a whole check of every file read
# ---------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "googlenet-checkpoint-v1"
TEMP_SUFFIX = ".tmp"


@dataclass
class ModelConfig:
    """What a checkpoint says about its model and data, enough to rebuild and use it. Plain
    metadata only: no paths, nothing that points outside the file."""
    arch: str
    num_classes: int
    class_names: list
    image_size: int
    source_size: int
    mean: tuple
    std: tuple
    dataset: str = ""
    model_options: dict = dataclasses.field(default_factory=dict)
    class_ids: list = dataclasses.field(default_factory=list)
    epoch: int = 0
    best_top1: float | None = None
    best_epoch: int | None = None
    val_top1: float | None = None
    run_id: str = ""


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def model_config_for(info, arch="tiny", image_size=None, **model_options):
    """The ModelConfig of a net of `arch` trained on DatasetInfo `info` at `image_size` (default:
    the dataset's decoded size)."""
    return ModelConfig(arch=arch, num_classes=len(info.class_names), class_names=list(info.class_names),
                       image_size=image_size or info.source_size, source_size=info.source_size,
                       mean=tuple(info.mean), std=tuple(info.std), dataset=info.name,
                       model_options=model_options, class_ids=list(info.class_ids))


def _atomic_write(path, write):
    """Call write(file) on a temporary file in path's folder, fsync, then rename over `path`: a
    crash or error midway leaves the previous file intact and no partial file behind (a kill -9
    can leave the temporary, which remove_stale_temporaries clears at the next start). The file
    gets the permissions the umask gives, like any file the user writes. A full, read-only or
    forbidden folder raises UserError naming it."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        disk = e if isinstance(e, OSError) else e.__context__  # torch.save wraps a failed write in a RuntimeError
        full = (errno.ENOSPC, errno.EDQUOT)
        if isinstance(disk, OSError) and disk.errno in (*full, errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "free some space there" if disk.errno in full else "make it writable"
            raise UserError(f"cannot write {path.name} in {path.parent} ({disk.strerror or disk}): {fix}, or "
                            f"pass another --checkpoint-dir; the files already there are intact") from None
        raise


def atomic_torch_save(obj, path):
    """torch.save that never leaves a truncated file (see _atomic_write)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src, dst):
    """Copy src to dst, never leaving a truncated dst (see _atomic_write)."""
    def copy(fout):
        with open(src, "rb") as fin:
            shutil.copyfileobj(fin, fout)
    _atomic_write(dst, copy)


def remove_stale_temporaries(folder):
    """Delete the temporaries of saves that a kill interrupted (.last.pt.<random>.tmp, ...)."""
    removed = 0
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        for tmp in Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _to_cpu(obj, copy=False):
    """Copy XLA/CUDA tensors in a nested state to the CPU, so checkpoints load anywhere (copy: CPU
    tensors too)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone() if copy else obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v, copy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v, copy) for v in obj)
    return obj


def save_checkpoint(path, model, optimizer, config, train_config=None, history=None, examples=None,
                    cli_args=None, scaler=None, position=None):
    """Write a self-describing checkpoint atomically (see atomic_torch_save): the ModelConfig, the
    weights, the optimizer state, the TrainConfig, the per-epoch metrics so far (`history`),
    a few small uint8 validation images for the demo (`examples`: {"images", "labels"}) and the
    command-line flags. Only tensors, numbers, strings, lists and dicts: it loads with
    weights_only=True."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(config),
        "model": _to_cpu(model.state_dict()),
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "train_config": dataclasses.asdict(train_config) if train_config is not None else None,
        "history": list(history or []),
        "examples": _to_cpu(examples) if examples is not None else None,
        "args": dict(cli_args or {}),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "position": position,  # where in an epoch a stopped run was (SIGTERM, Ctrl-C, --save-every)
        "torch_version": str(torch.__version__),
    }
    atomic_torch_save(checkpoint, path)


MAX_IMAGE_SIZE = 1024  # image_size / source_size a checkpoint may set: larger ones take seconds and GBs per image
MAX_METADATA_BYTES = 16 * 2**20  # a checkpoint's pickle (everything but tensors): bounds unpickling memory
MAX_EXAMPLES = 16
CHECKPOINT_KEYS = ("format", "config", "model", "optimizer", "train_config", "history", "examples", "args",
                   "torch_version", "scaler", "position")


def _number(value, low=-math.inf, high=math.inf):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high


def _rng_state(value):
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel() <= 2**16


def _whole(value, low, high=math.inf):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _plain(value):
    return value is None or isinstance(value, (str, bool)) or _number(value)


def _flags(value):
    return isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items())


def _three(value, low):
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_number(v) and v > low for v in value)


# Every config field: (check, what it must be). The first seven are required.
_CONFIG_RULES = {
    "arch": (lambda v: isinstance(v, str) and v in ARCHS, f"one of {', '.join(ARCHS)}"),
    "num_classes": (lambda v: _whole(v, 2, 100_000), "a whole number 2-100000"),
    "class_names": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of strings"),
    "image_size": (lambda v: _whole(v, 8, MAX_IMAGE_SIZE), f"a whole number 8-{MAX_IMAGE_SIZE}"),
    "source_size": (lambda v: _whole(v, 8, MAX_IMAGE_SIZE), f"a whole number 8-{MAX_IMAGE_SIZE}"),
    "mean": (lambda v: _three(v, -math.inf), "three finite numbers"),
    "std": (lambda v: _three(v, 0), "three finite numbers above 0"),
    "dataset": (lambda v: isinstance(v, str), "a string"),
    "model_options": (_flags, "a dict of flags"),
    "class_ids": (lambda v: isinstance(v, list) and all(isinstance(c, (str, int)) for c in v), "a list of strings"),
    "epoch": (lambda v: _whole(v, 0), "a whole number"),
    "best_epoch": (lambda v: v is None or _whole(v, 0), "a whole number or null"),
    "best_top1": (lambda v: v is None or _number(v, 0, 1), "a fraction in [0, 1] or null"),
    "val_top1": (lambda v: v is None or _number(v, 0, 1), "a fraction in [0, 1] or null"),
    "run_id": (lambda v: isinstance(v, str), "a string"),
}


def is_epoch_record(record):
    """Whether `record` is a per-epoch metrics line as train() writes them (history, metrics.jsonl):
    a whole epoch, val_top1 in [0, 1] and otherwise plain values, numbers finite."""
    return (isinstance(record, dict) and _whole(record.get("epoch"), 1) and _number(record.get("val_top1"), 0, 1)
            and all(_number(record[k], 0, 1) for k in ("val_top5", "train_top1") if k in record)
            and all(isinstance(k, str) and (_plain(v) or isinstance(v, list) and all(map(_number, v)))
                    for k, v in record.items()))


def load_checkpoint(path):
    """Read and check a checkpoint written by save_checkpoint (on the CPU, weights_only: no code
    from the file runs). Raises CheckpointError with one line saying what is wrong: a missing
    file, a folder, a file that is not a checkpoint, one of another program, or one that
    check_checkpoint refuses. Tensors are memory-mapped until checked, so an oversized file is
    refused without being read."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint: pass a file in it, e.g. "
                              f"{path / 'best.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: train one with "
                              f"`python googlenet.py` or pass the path of a .pt file it wrote")
    import zipfile
    try:  # torch.save's format; anything else is not ours
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{path} is not a checkpoint (not a PyTorch file: an image, text, or "
                              f"truncated): pass a last.pt or best.pt written by googlenet.py") from None
    # torch.save stores entries uncompressed; a compressed one could unpack to any size.
    if any(e.compress_type != zipfile.ZIP_STORED or e.filename.endswith("data.pkl") and e.file_size > MAX_METADATA_BYTES
           for e in entries):
        raise CheckpointError(f"{path} is compressed or holds over {MAX_METADATA_BYTES >> 20} MiB of metadata, "
                              f"which googlenet.py never writes: pass a last.pt or best.pt written by googlenet.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in first_line or "Unsupported global" in first_line:
            first_line = "it holds Python objects beyond weights and plain data, which are not loaded"
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, or not written by "
                              f"googlenet.py): {first_line[:200]}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a googlenet.py checkpoint (no '{CHECKPOINT_FORMAT}' "
                              f"marker): pass a last.pt or best.pt written by googlenet.py")
    check_checkpoint(path, checkpoint)
    # Checked, so bounded: now copy the tensors into memory. Mapped ones would fault (SIGBUS) once
    # the file is rewritten in place, e.g. by torch.save(checkpoint, path) after a change.
    return _to_cpu(checkpoint, copy=True)


def check_checkpoint(path, checkpoint):
    """Check every entry of a checkpoint dict before anything uses it: known keys only, each
    config field's type and range, the history, flags and example images, weights with exactly
    the keys, shapes and dtypes of the net its config describes (and finite), and no more tensor
    bytes than that net's weights and optimizer state take. Raises CheckpointError (one line)."""
    def refuse(problem):
        raise CheckpointError(f"{path}: {problem}; use a checkpoint written by googlenet.py")

    unknown = sorted(map(str, set(checkpoint) - set(CHECKPOINT_KEYS)))
    if unknown:
        refuse(f"unknown entry {unknown[0]!r} (a checkpoint holds {', '.join(CHECKPOINT_KEYS)})")
    config = checkpoint.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no model config: it is damaged or not from googlenet.py")
    for index, (key, (ok, what)) in enumerate(_CONFIG_RULES.items()):
        if (index < 7 or key in config) and not ok(config.get(key)):
            refuse(f"config field {key!r} must be {what}, not {config.get(key)!r:.60}")
    odd = sorted(str(k) for k, v in config.items() if k not in _CONFIG_RULES and not _plain(v))
    if odd:  # unknown plain fields are ignored; anything bigger (a tensor, a list) is refused
        refuse(f"unknown config field {odd[0]!r} holds more than a plain value")
    if len(config["class_names"]) != config["num_classes"]:
        refuse(f"{config['num_classes']} classes but {len(config['class_names'])} class names")
    size, examples = config["source_size"], checkpoint.get("examples")
    sections = {
        "history": (lambda v: isinstance(v, list) and all(map(is_epoch_record, v)), "a list of per-epoch records"),
        "args": (_flags, "a dict of flags"), "train_config": (_flags, "a dict of settings"),
        "torch_version": (lambda v: isinstance(v, str), "a string"),
        "scaler": (lambda v: isinstance(v, dict) and all(map(_number, v.values())), "a GradScaler state"),
        "position": (lambda v: isinstance(v, dict) and _whole(v.get("epoch"), 0, 10**6) and _whole(v.get("step"), 1, 10**9)
                     and isinstance(v.get("sums"), list) and len(v["sums"]) == 5 and all(map(_number, v["sums"]))
                     and _number(v.get("seconds"), 0) and _rng_state(v.get("rng"))
                     and (v.get("cuda_rng") is None or _rng_state(v["cuda_rng"])),
                     "an epoch, step, metric sums and RNG state"),
        "examples": (lambda v: isinstance(v, dict) and set(v) == {"images", "labels"}
                     and isinstance(v["images"], torch.Tensor) and v["images"].dtype == torch.uint8
                     and v["images"].shape[1:] == (3, size, size) and 1 <= len(v["images"]) <= MAX_EXAMPLES
                     and isinstance(v["labels"], list) and len(v["labels"]) == len(v["images"])
                     and all(_whole(label, 0, config["num_classes"] - 1) for label in v["labels"]),
                     f"1-{MAX_EXAMPLES} uint8 images [3, {size}, {size}] with their labels"),
        "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list)
                      and all(isinstance(g, dict) and all(_plain(x) or isinstance(x, list) and all(map(_plain, x))
                                                          for x in g.values()) for g in v["param_groups"])
                      and isinstance(v.get("state"), dict) and all(
                          isinstance(s, dict) and all(isinstance(x, torch.Tensor) or _plain(x) for x in s.values())
                          for s in v["state"].values()), "an SGD optimizer state"),
    }
    for key, (ok, what) in sections.items():
        if checkpoint.get(key) is not None and not ok(checkpoint[key]):
            refuse(f"{key!r} must be {what}")
    weights = checkpoint.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} has no weights (a 'model' dict of tensors)")
    try:
        expected = build_model(config["arch"], config["num_classes"], **config.get("model_options", {})).state_dict()
    except (RuntimeError, TypeError, ValueError) as e:
        refuse(f"config field 'model_options' does not build a net ({str(e).strip()[:120]})")
    misfit = sorted(map(str, set(weights) ^ set(expected))) + [
        k for k, e in expected.items() if k in weights and not (
            isinstance(weights[k], torch.Tensor) and weights[k].shape == e.shape and weights[k].dtype == e.dtype)]
    if misfit:
        raise CheckpointError(f"{path}: its weights do not fit its own config ({config['arch']}, "
                              f"{config['num_classes']} classes): {misfit[0]}"
                              f"{f' and {len(misfit) - 1} more' if len(misfit) > 1 else ''}")
    # Storage bytes, not view bytes: a small view can pin a huge storage. Mapped, not yet read.
    moments = (checkpoint.get("optimizer") or {}).get("state", {}).values()
    tensors = [*weights.values(), *(x for s in moments for x in s.values() if isinstance(x, torch.Tensor)),
               *([examples["images"]] if examples is not None else [])]
    held = sum(t.untyped_storage().nbytes() for t in tensors)
    allowed = 4 * sum(e.nbytes for e in expected.values()) + MAX_EXAMPLES * 3 * size * size
    if held > allowed:
        refuse(f"it holds {held / 2**20:.0f} MiB of tensors, more than a {config['arch']} net with "
               f"{config['num_classes']} classes and its optimizer state take ({allowed / 2**20:.0f} MiB)")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: weights are NaN or infinite ({bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); use an earlier checkpoint")


def model_from_checkpoint(checkpoint):
    """(model on the CPU with the checkpoint's weights, ModelConfig)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in checkpoint["config"].items() if k in fields})
    config.mean, config.std = tuple(config.mean), tuple(config.std)
    model = build_model(config.arch, config.num_classes, **config.model_options)
    model.load_state_dict(checkpoint["model"])
    return model, config


def load_for_inference(path, device="cpu"):
    """Rebuild a trained model from a checkpoint alone: (model in eval mode on `device`,
    ModelConfig with classes, image size and normalisation). Use predict_proba to classify."""
    model, config = model_from_checkpoint(load_checkpoint(path))
    return model.to(device).eval(), config


# ---------------------------------------------------------------------------------------------
# CLI: flags -> the library calls above; one line and exit code 2 for every mistake
# ---------------------------------------------------------------------------------------------

def number(kind, minimum, inclusive=True):
    """An argparse type: an int or float at least (or above) `minimum`, with a message that names
    the rule (argparse adds the flag)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if value < minimum or (value == minimum and not inclusive) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {minimum}, got {text}")
        return value
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show a default only where it tells something
        if action.default in (None, False, True) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message, raised for main() to report
        raise UserError(f"{message} (see python googlenet.py --help)")


def build_parser():
    defaults = TrainConfig()
    p = _Parser(description="Train and evaluate GoogLeNet (Inception v1) on Tiny ImageNet, "
                            "CIFAR-10 or an image folder, on CUDA, TPU (torch_xla) or CPU. "
                            "Several GPUs or hosts: launch it with torchrun.",
                formatter_class=_HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="tiny", choices=DATASETS,
                   help="tiny = Tiny ImageNet 200; folder = DIR/train/<class>, DIR/val/<class>")
    d.add_argument("--data-dir", default="data",
                   help="the folder holding tiny-imagenet-200/ or cifar-10-batches-py/, or that dataset "
                        "folder itself; for --dataset folder, the folder with train/ and val/")
    d.add_argument("--download", action="store_true", help="fetch the dataset if it is missing")
    d.add_argument("--image-size", type=number(int, 8), default=None,
                   help="network input size (default: 224 for original; 64 for tiny/folder, 32 for CIFAR-10)")
    d.add_argument("--subset", type=number(int, 0), default=0,
                   help="about N training and N validation images, drawn evenly from every class "
                        "(seeded by --seed; 0 = all)")
    d.add_argument("--loader", default="fast", choices=("fast", "torch"),
                   help="fast = decode once to uint8 in memory, augment on the device; "
                        "torch = per-sample PIL DataLoader (for data too big for memory)")
    d.add_argument("--crop", default=None, choices=("pad", "resized"),
                   help="train crop: pad = shifted crop with zero padding; resized = random-resized "
                        "crop (default: resized for folder, pad otherwise)")
    d.add_argument("--workers", type=number(int, 0), default=min(4, os.cpu_count() or 1),
                   help="decoding processes / DataLoader workers")
    d.add_argument("--cache", action="store_true",
                   help="keep the decoded uint8 store on disk (DATA/.googlenet-cache) for later runs")
    d.add_argument("--cache-dir", default=None, help="where --cache writes (implies --cache)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="skip undecodable images (counted) instead of stopping")

    m = p.add_argument_group("model")
    m.add_argument("--arch", default="tiny", choices=ARCHS,
                   help="original = the paper's 224 net; tiny = 64x64 stem with BatchNorm")
    m.add_argument("--batch-norm", default=None, action=argparse.BooleanOptionalAction,
                   help="BatchNorm after every conv (default: on for tiny, off for original)")
    m.add_argument("--no-aux", dest="aux", action="store_false", help="drop the two auxiliary heads")
    m.add_argument("--aux-weight", type=number(float, 0), default=defaults.aux_weight,
                   help="loss weight of each aux head")

    t = p.add_argument_group("training recipe")
    t.add_argument("--epochs", type=number(int, 1), default=defaults.epochs,
                   help="total epochs (a resumed run stops here too)")
    t.add_argument("--batch-size", type=number(int, 1), default=defaults.batch_size,
                   help="per device / process; the global batch is this x processes")
    t.add_argument("--lr", type=number(float, 0, inclusive=False), default=defaults.lr,
                   help="peak SGD learning rate per 256 images, scaled to the global batch")
    t.add_argument("--schedule", default=defaults.schedule, choices=SCHEDULES,
                   help="cosine = per-step linear warmup, then cosine decay to 0 at the last step; "
                        "paper = warmup, then x0.96 every 8 epochs (Szegedy et al.)")
    t.add_argument("--warmup-epochs", type=number(float, 0), default=defaults.warmup_epochs,
                   help="linear warmup from 0 to the peak lr, per step")
    t.add_argument("--momentum", type=number(float, 0), default=defaults.momentum, help="SGD momentum")
    t.add_argument("--nesterov", default=defaults.nesterov, action=argparse.BooleanOptionalAction,
                   help="Nesterov momentum (default: on)")
    t.add_argument("--weight-decay", type=number(float, 0), default=defaults.weight_decay,
                   help="L2 weight decay on conv and FC weights (never on BatchNorm or biases)")
    t.add_argument("--label-smoothing", type=number(float, 0), default=defaults.label_smoothing,
                   help="cross-entropy label smoothing")
    t.add_argument("--tta", default=defaults.tta, action=argparse.BooleanOptionalAction,
                   help="validation scores each image by the mean logits of it and its mirror image "
                        "(test-time augmentation; a second forward pass)")
    t.add_argument("--seed", type=int, default=defaults.seed,
                   help="seeds data order, augmentation, init, dropout and --subset")
    t.add_argument("--precision", default=defaults.precision, choices=PRECISIONS,
                   help="auto = bf16 autocast where the hardware runs it natively (CUDA compute capability "
                        "8.0+, TPUs, CPUs with avx512_bf16 / AMX), fp16 autocast + GradScaler on older CUDA "
                        "GPUs, else fp32; weights and optimizer stay fp32")
    t.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="channels_last memory format (default: on for CUDA and CPU, off on XLA)")
    t.add_argument("--compile", default=False, action=argparse.BooleanOptionalAction,
                   help="torch.compile the training step (default: off; a one-off compile of minutes)")
    t.add_argument("--log-interval", type=number(int, 0), default=defaults.log_interval,
                   help="steps between progress lines, and one at least every ~30 s (0 = epoch lines only)")
    t.add_argument("--save-every", type=number(float, 0), default=defaults.save_every, metavar="MINUTES",
                   help="also save the position within the epoch to last.pt this often (0 = at epoch ends; "
                        "SIGTERM and Ctrl-C always save it)")

    r = p.add_argument_group("device, scale-out, checkpoints")
    r.add_argument("--device", default="auto", choices=("auto", "cuda", "xla", "cpu"),
                   help="auto = CUDA, else XLA (torch_xla with a TPU or PJRT_DEVICE), else CPU")
    r.add_argument("--num-cores", type=number(int, 1), default=None,
                   help="TPU: 1 core, or leave out for all of them (torch_xla's launcher)")
    r.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA: BatchNorm statistics over all processes (default: per process)")
    r.add_argument("--checkpoint-dir", default=None,
                   help="where last.pt, best.pt, metrics.jsonl go (default: runs/<dataset>; "
                        "with --resume PATH, PATH's folder)")
    r.add_argument("--resume", nargs="?", const="last", default=None,
                   help="continue from a checkpoint (no value: <checkpoint-dir>/last.pt)")
    r.add_argument("--evaluate", action="store_true", help="only evaluate the --resume checkpoint")
    r.add_argument("--benchmark", action="store_true",
                   help="time training steps of the default path against a naive loop on the same images, then exit")
    r.add_argument("--benchmark-steps", type=number(int, 1), default=20, help="steps each path is timed for")
    r.add_argument("--benchmark-data", action="store_true",
                   help="measure images/s of the fast and torch data paths, then exit")
    return p


# Flags that describe this invocation, not the run: never taken from a checkpoint on --resume.
_NOT_RESUMED = ("resume", "evaluate", "benchmark", "benchmark_data", "benchmark_steps", "device",
                "num_cores", "checkpoint_dir", "download")


def parse_args(argv=None):
    """Parse the command line; with --resume, the checkpoint's saved flags become the defaults, so
    `--resume runs/x/last.pt` alone continues the same run and any flag given overrides."""
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume:
        path = args.resume
        if path == "last":
            path = Path(args.checkpoint_dir or f"runs/{args.dataset}") / "last.pt"
        checkpoint = load_checkpoint(path)
        saved = {k: v for k, v in (checkpoint.get("args") or {}).items()
                 if k not in _NOT_RESUMED and k in vars(args)}
        parser.set_defaults(**saved)
        args = parser.parse_args(argv)
        args.resume = str(path)
        if args.checkpoint_dir is None:
            args.checkpoint_dir = str(Path(path).parent)
    if args.cache_dir:
        args.cache = True
    if args.crop is None:  # photos of any framing benefit from scale jitter; 32/64px sets from shifts
        args.crop = "resized" if args.dataset == "folder" else "pad"
    if args.image_size is None:
        args.image_size = 224 if args.arch == "original" else 32 if args.dataset == "cifar10" else 64
    if args.image_size > MAX_IMAGE_SIZE:  # checkpoints larger than this are refused when read
        raise UserError(f"--image-size must be at most {MAX_IMAGE_SIZE}, got {args.image_size}")
    if args.checkpoint_dir is None:
        args.checkpoint_dir = f"runs/{args.dataset}"
    return args, checkpoint


def train_config_from(args):
    """The TrainConfig the flags describe."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in vars(args).items() if k in names}).check()
    except ValueError as e:
        raise UserError(f"--{str(e).replace('_', '-')}") from None


def check_checkpoint_dir(out_dir, resume_path=None, resumed=None):
    """Refuse, before any data is decoded, to write where another run's files would be lost: a new
    run into a folder with a last.pt, best.pt or metrics.jsonl; a resume into a folder whose
    checkpoints are of a different run, or whose last.pt is newer than the checkpoint resumed from."""
    out_dir = Path(out_dir)
    found = [out_dir / name for name in ("last.pt", "best.pt", "metrics.jsonl") if (out_dir / name).exists()]
    checkpoints = [p for p in found if p.suffix == ".pt"]
    if found and (resumed is None or not checkpoints):
        advice = f"continue that run with --resume {checkpoints[0]}, or " if checkpoints and resumed is None else ""
        raise UserError(f"{out_dir} holds another run's {' and '.join(p.name for p in found)}: {advice}"
                        f"pass another --checkpoint-dir")
    for path in checkpoints:
        if resume_path is not None and path.resolve() == Path(resume_path).resolve():
            continue
        there, mine = load_checkpoint(path)["config"], resumed["config"]
        if there.get("run_id", "") != mine.get("run_id", ""):
            raise UserError(f"{out_dir} holds a different run (its {path.name} is not from the run of "
                            f"{resume_path}): pass another --checkpoint-dir")
        if path.name == "last.pt" and there.get("epoch", 0) > mine.get("epoch", 0):
            raise UserError(f"{path} is at epoch {there['epoch']}, newer than {resume_path} (epoch {mine['epoch']}): "
                            f"resume from {path}, or pass another --checkpoint-dir to branch off")


def check_room_for_checkpoints(out_dir, model):
    """Refuse, before any data is decoded, a checkpoint folder that cannot be written or has no
    room for two checkpoints of `model` (weights and optimizer state: about twice its state)."""
    out_dir = Path(out_dir)
    needed = 2 * 2 * sum(t.nbytes for t in model.state_dict().values())
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
        free = shutil.disk_usage(out_dir).free
    except OSError as e:
        raise UserError(f"cannot write checkpoints to {out_dir} ({e.strerror or e}): pass a --checkpoint-dir "
                        f"you can write to") from None
    if free < needed:
        raise UserError(f"{out_dir} has {free / 2**20:.0f} MiB free, less than the {needed / 2**20:.0f} MiB two "
                        f"checkpoints of this model take: free some space or pass another --checkpoint-dir")


def _log_master(device):
    """print for the master process, nothing for the others. On an interactive terminal, progress
    lines overwrite each other in place (one live line per epoch); logs and CI get plain lines."""
    if not device.is_master:
        return lambda *a, **k: None
    if not sys.stdout.isatty():
        return functools.partial(print, flush=True)

    def live(line):
        progress = " step " in line and "/" in line.split(" step ", 1)[1][:12]
        sys.stdout.write("\r\x1b[K" + line + ("" if progress else "\n"))
        sys.stdout.flush()
    return live


def run(args, checkpoint=None):
    """Train (or evaluate) as the parsed args say, in this process (one of several under torchrun
    or torch_xla's launcher). Returns the history (or the evaluation)."""
    if checkpoint is None and args.resume:  # each launched process reads it itself
        checkpoint = load_checkpoint(args.resume)
    config = train_config_from(args)
    device = make_device(args.device)
    return _run(args, checkpoint, config, device, _log_master(device))  # main() closes the process group


def _run(args, checkpoint, config, device, log):
    if args.evaluate and checkpoint is None:
        raise UserError("--evaluate needs --resume PATH of the checkpoint to evaluate")
    if not args.evaluate:
        check_checkpoint_dir(args.checkpoint_dir, args.resume, checkpoint)
    if checkpoint is not None and not args.evaluate and checkpoint["config"]["epoch"] >= config.epochs:
        log(f"{args.resume} has already trained {checkpoint['config']['epoch']} epochs: pass --epochs N "
            f"(> {checkpoint['config']['epoch']}) to train longer")
        if device.is_master and checkpoint.get("history"):  # a kill after last.pt, before metrics.jsonl
            write_metrics(Path(args.checkpoint_dir) / "metrics.jsonl", checkpoint["history"])
        return checkpoint.get("history") or []
    if args.sync_bn and device.kind != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs under torchrun (PyTorch's SyncBatchNorm runs on GPUs)")
    if config.precision == "fp16" and device.kind == "xla":
        raise UserError("--precision fp16 is for CUDA GPUs and the CPU; TPUs train in bf16 (--precision auto)")
    torch.manual_seed(config.seed)
    info = first_on_each_node(device, lambda first: load_dataset(args.dataset, args.data_dir, args.image_size,
                                                                 args.download and first))
    num_classes = len(info.class_names)
    options = {"aux_logits": args.aux, "batch_norm": args.batch_norm}
    if checkpoint is not None:  # the weights decide the model's shape, not today's flags
        options = checkpoint["config"].get("model_options") or {}
        saved = checkpoint["config"]
        if (saved["arch"], saved["num_classes"]) != (args.arch, num_classes):
            raise CheckpointError(f"{args.resume} holds a {saved['arch']} net with {saved['num_classes']} "
                                  f"classes, but this run builds {args.arch} with {num_classes}")
        if saved.get("class_ids") and saved["class_ids"] != info.class_ids:
            raise CheckpointError(f"{args.resume} was trained on other classes than {args.data_dir} "
                                  f"has (e.g. {saved['class_ids'][0]!r} vs {info.class_ids[0]!r})")
    model_config = ModelConfig(arch=args.arch, num_classes=num_classes, class_names=info.class_names,
                               image_size=args.image_size, source_size=info.source_size, mean=info.mean,
                               std=info.std, dataset=info.name, model_options=options, class_ids=info.class_ids,
                               run_id=checkpoint["config"].get("run_id", "") if checkpoint else "")
    model = build_model(args.arch, num_classes, **options)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    if not args.evaluate and device.is_master:
        check_room_for_checkpoints(args.checkpoint_dir, model)
    if args.sync_bn and device.distributed == "ddp":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    precision = resolve_precision(config.precision, device)
    where = f"{device.kind} ({device.torch_device}{', ' + device.note if device.note else ''})"
    if device.world_size > 1:
        where += (f", {device.world_size} processes: global batch {config.batch_size * device.world_size}, "
                  f"peak lr {peak_lr(config, device.world_size):.4g}")
    log(f"device: {where}; precision {precision}{' (autocast + GradScaler)' if precision == 'fp16' else ''}; "
        f"model {args.arch}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {num_classes} classes, "
        f"{args.image_size}x{args.image_size} input")
    if device.kind == "cuda" and device.world_size == 1 and torch.cuda.device_count() > 1:
        log(f"note: this host has {torch.cuda.device_count()} GPUs and this run uses one; to use all: "
            f"torchrun --standalone --nproc_per_node {torch.cuda.device_count()} googlenet.py ...")

    cache_dir = args.cache_dir or (Path(info.root) / ".googlenet-cache" if args.cache and info.root else None)
    loader, store_device = args.loader, None
    if loader == "fast":
        # Decide before decoding: a store that cannot fit would be killed for memory hours in.
        one, available = store_bytes(info, args.subset), available_memory_bytes()
        needed = one * int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # each process on this host decodes its own
        if available is not None and needed > 0.7 * available:
            loader = "torch"
            log(f"the decoded uint8 stores (one per process on this host) would take {needed / 2**30:.1f} GiB "
                f"of the {available / 2**30:.1f} GiB available: using --loader torch (per-sample decoding) instead")
        elif device.kind == "cuda" and one < 0.25 * torch.cuda.mem_get_info(device.torch_device)[0]:
            store_device = device.torch_device  # fits on the GPU: keep it there
    train_loader, val_loader = make_loaders(
        info, config.batch_size, args.image_size, loader, config.crop, args.workers, args.subset,
        config.seed, cache_dir, args.skip_bad_images, device.rank, device.world_size, log,
        need_train=not args.evaluate, store_device=store_device,
        device=device.torch_device if device.kind == "cuda" else None)
    if args.evaluate:
        model.to(device.torch_device)
        result = evaluate(model, val_loader, device, model_config, config.precision, tta=config.tta)
        log(f"evaluate {args.resume}: val loss {result['loss']:.4f} top1 {result['top1']:.4f} "
            f"top5 {result['top5']:.4f} over {result['images']} images{' (flip TTA)' if config.tta else ''}")
        return result
    if checkpoint is not None:
        log(f"resumed from {args.resume} at epoch {checkpoint['config']['epoch']}; writing to {args.checkpoint_dir}")
    else:
        log(f"writing checkpoints to {args.checkpoint_dir}")
    examples = (checkpoint or {}).get("examples") or pick_examples(info, info.source_size)
    cli_args = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return train(model, train_loader, val_loader, model_config, config, device, args.checkpoint_dir,
                 resume=checkpoint, examples=examples, cli_args=cli_args, log=log)


def _xla_worker(index, args):
    # One process per TPU core, started by torch_xla.launch; only the master logs and saves.
    run(args)


def _one_line(error):
    """The message of a UserError, also when a DataLoader worker raised it (PyTorch then wraps it
    in a traceback text; its last line is ours)."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv=None):
    """Command-line entry point; returns the exit code (2 with one line on bad input, 1 when the
    loss diverged)."""
    import torch.distributed as dist
    args = None
    try:
        args, checkpoint = parse_args(argv)
        args.device = resolve_device_kind(args.device)
        if args.benchmark_data:
            benchmark_data(args)
            return 0
        if args.benchmark:
            benchmark(args)
            return 0
        if args.device == "xla" and args.num_cores != 1:
            if os.environ.get("PJRT_DEVICE", "").upper() == "CPU":
                if args.num_cores is not None:
                    raise UserError("CPU-XLA (PJRT_DEVICE=CPU) runs one process: several CPU processes train "
                                    "with `torchrun --nproc_per_node N googlenet.py --device cpu`")
            else:
                if args.num_cores is not None:
                    raise UserError("on a TPU, torch_xla's launcher runs on one core or on all: pass "
                                    "--num-cores 1 or leave --num-cores out")
                if args.download:  # once, here: processes downloading together would trample each other
                    load_dataset(args.dataset, args.data_dir, args.image_size, download=True)
                    args.download = False
                import torch_xla
                torch_xla.launch(_xla_worker, args=(args,))
                return 0
        run(args, checkpoint)
        return 0
    except Stopped as e:  # saved where it stopped: not an error
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr)
        return e.exit_code
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one line, from rank 0
            print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        if e.everywhere and dist.is_initialized():  # all raised it: leave once rank 0 has said why,
            dist.barrier()  # as torchrun stops the other processes at the first one's exit
        return 1 if isinstance(e, TrainingDiverged) else 2
    except KeyboardInterrupt:
        last = Path(args.checkpoint_dir) / "last.pt" if args is not None else None
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted: {last} holds the last saved epoch; continue with --resume" if last and last.exists()
                  else "interrupted before any epoch was saved: nothing to resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Benchmarks (CLI only): --benchmark and --benchmark-data
# ---------------------------------------------------------------------------------------------

class _NaiveDataset(torch.utils.data.Dataset):
    """The notebook way: open each image with PIL per sample, resize, pad-crop, flip, ToTensor."""

    def __init__(self, split, size, mean, std):
        from torchvision import transforms as T
        self.split = split
        self.transform = T.Compose([T.Resize((size, size)), T.RandomCrop(size, padding=max(1, size // 8)),
                                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        from PIL import Image
        if self.split.files is not None:
            with Image.open(self.split.files[i]) as img:
                image = img.convert("RGB")
        else:
            image = Image.fromarray(self.split.arrays[i])
        return self.transform(image), self.split.labels[i]


def _peak_memory_mib(device):
    if device.kind == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def benchmark(args):
    """Time --benchmark-steps training steps of the default path (uint8 store, on-device
    augmentation, auto precision, channels_last, foreach SGD, no per-step sync) and of a naive
    loop (per-sample PIL DataLoader, fp32 NCHW, .item() every step) on the same images, same
    model, batch and worker count; print both, their ratio and peak memory."""
    device = make_device(args.device)
    config = train_config_from(args)
    config.log_interval = 0
    steps, batch = args.benchmark_steps, config.batch_size
    info = load_dataset(args.dataset, args.data_dir, args.image_size, args.download)
    images = (steps + 2) * batch
    info.train = info.train.subset(images, config.seed)
    num_classes = len(info.class_names)
    model_config = ModelConfig(args.arch, num_classes, info.class_names, args.image_size, info.source_size,
                               info.mean, info.std, info.name)
    print(f"benchmark: {args.arch} at {args.image_size}x{args.image_size}, batch {batch}, {steps} steps, "
          f"{args.workers} workers, device {device.kind}, precision {resolve_precision(config.precision, device)}",
          flush=True)

    def naive():
        torch.manual_seed(config.seed)
        model = build_model(args.arch, num_classes, aux_logits=args.aux).to(device.torch_device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loader = torch.utils.data.DataLoader(
            _NaiveDataset(info.train, args.image_size, info.mean, info.std), batch_size=batch, shuffle=True,
            drop_last=True, num_workers=args.workers, multiprocessing_context="spawn" if args.workers else None)
        start, count = None, 0
        for step, (x, y) in enumerate(loader):
            if step == 2:
                start = time.perf_counter()  # after warm-up: workers started, first steps done
            x, y = x.to(device.torch_device), y.to(device.torch_device)
            loss = googlenet_loss(model(x), y, config.aux_weight).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
            count += batch if start else 0
        return count / (time.perf_counter() - start)

    def default():
        torch.manual_seed(config.seed)
        model = build_model(args.arch, num_classes, aux_logits=args.aux).to(device.torch_device)
        if uses_channels_last(config, device):
            model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, config, device.kind)
        store = build_store(info.train, info.source_size, args.workers, log=lambda *a: None)
        warm = StoreLoader(ImageStore(store.images[:2 * batch], store.labels[:2 * batch]), batch, True, config.seed)
        timed = StoreLoader(ImageStore(store.images[2 * batch:], store.labels[2 * batch:]), batch, True, config.seed)
        train_one_epoch(model, warm, optimizer, device, model_config, config, 0, lambda *a: None)
        result = train_one_epoch(model, timed, optimizer, device, model_config, config, 0, lambda *a: None)
        return result["images"] / result["seconds"]

    rates = {}
    for name, measure in (("naive", naive), ("default", default)):
        rates[name] = measure()
        print(f"{name:>8}: {rates[name]:7.1f} img/s, peak memory so far {_peak_memory_mib(device):.0f} MiB",
              flush=True)
    print(f"default / naive = {rates['default'] / rates['naive']:.2f}x")
    return rates


def benchmark_data(args, batches=60):
    """images/s of the fast path (uint8 store + on-device augmentation) and the per-sample PIL
    DataLoader, on the same training data, same batch size and worker count, in one run."""
    device = make_device(args.device)
    config = train_config_from(args)
    info = load_dataset(args.dataset, args.data_dir, args.image_size, args.download)
    results = {}
    for loader_kind in ("torch", "fast"):
        start = time.perf_counter()
        train_loader, _ = make_loaders(info, config.batch_size, args.image_size, loader_kind, config.crop,
                                       args.workers, args.subset, config.seed)
        setup = time.perf_counter() - start
        count, n = 0, min(batches, len(train_loader))
        iterator = device_batches(train_loader, device)
        images, labels, params = next(iterator)  # warm-up: workers start, first batch
        start = time.perf_counter()
        for _ in range(n - 1):
            images, labels, params = next(iterator)
            if images.dtype == torch.uint8:
                images = train_transform(images, params, args.image_size, info.mean, info.std, config.crop)
            count += images.shape[0]
        _sync(device, images)
        results[loader_kind] = count / (time.perf_counter() - start)
        print(f"{loader_kind:>5}: {results[loader_kind]:8.0f} images/s over {count} images "
              f"(setup {setup:.1f}s), batch {config.batch_size}, workers {args.workers}", flush=True)
        del iterator, train_loader
    ratio = results["fast"] / results["torch"]
    print(f"fast / torch = {ratio:.1f}x on {args.dataset} at {args.image_size}x{args.image_size}, device {device.kind}")
    return results


def _sync(device, tensor):
    if device.kind == "cuda":
        torch.cuda.synchronize()
    elif device.kind == "xla":
        import torch_xla
        torch_xla.sync()
        tensor.cpu()


if __name__ == "__main__":
    sys.exit(main())
