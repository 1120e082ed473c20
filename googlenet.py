"""GoogLeNet (Inception v1, Szegedy et al. 2015) in one file: model, data, device, train/eval,
checkpoint, CLI.

  python googlenet.py --dataset tiny --data-dir data --download        # Tiny ImageNet
  python googlenet.py --dataset tiny --device xla                      # TPU (all cores)
  torchrun --standalone --nproc_per_node 8 googlenet.py --dataset tiny # 8 GPUs, DDP
  python googlenet.py --dataset folder --data-dir photos   # photos/{train,val}/<class>/<image>
  python googlenet.py --resume runs/tiny/last.safetensors              # continue a run
  python googlenet.py --evaluate --resume runs/tiny/best.safetensors   # only evaluate

From Python: load_dataset, build_model, make_loaders, train, load_for_inference (see README).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import random
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
    """A problem with the user's input; str(error) is one line that says what to do."""
    everywhere = False  # raised by every process at once, from a decision they took together

class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, inconsistent or not one of ours."""

class ImageDecodeError(UserError):
    """A file that cannot be decoded as an image."""

class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than the caller allows."""


# ---------------------------------------------------------------------------------------------
# Model: the Inception block, the aux head and both nets, built from the paper's channel table
# ---------------------------------------------------------------------------------------------

# The paper's Table 1: (in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) per block
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
GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux1", "aux2"])  # training, aux on

class ConvReLU(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, batch_norm=False):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                            padding=kernel_size // 2, bias=not batch_norm)]  # BN has its own shift
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        super().__init__(*layers, nn.ReLU(inplace=True))

class ChannelLRN(nn.Module):
    """The paper's LRN (as nn.LocalResponseNorm), its channel window a 1x1 conv: fast in bf16."""

    def __init__(self, channels, size=5, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        self.beta = beta
        self.k = k
        offset = torch.arange(channels)[None, :] - torch.arange(channels)[:, None]  # in - out
        band = ((offset >= -(size // 2)) & (offset <= (size - 1) // 2)).float() * (alpha / size)
        self.register_buffer("band", band[:, :, None, None], persistent=False)

    def forward(self, x):  # x / (k + alpha * the window's mean of x^2)^beta
        return x / (self.k + F.conv2d(x * x, self.band.to(x.dtype))).pow(self.beta)

class Inception(nn.Module):
    """Branches 1x1 | 1x1, 3x3 | 1x1, 5x5 (the paper's; torchvision's is 3x3) | pool, 1x1."""

    def __init__(self, cin, c1, r3, c3, r5, c5, pool_proj, batch_norm=False):
        super().__init__()
        conv = functools.partial(ConvReLU, batch_norm=batch_norm)
        self.branch1 = conv(cin, c1, 1)
        self.branch2 = nn.Sequential(conv(cin, r3, 1), conv(r3, c3, 3))
        self.branch3 = nn.Sequential(conv(cin, r5, 1), conv(r5, c5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(cin, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)

class AuxClassifier(nn.Module):
    """The paper's auxiliary head: avg-pool to 4x4, 1x1 conv 128, FC 1024, dropout 0.7, FC."""

    def __init__(self, in_channels, num_classes, batch_norm=False, dropout=0.7):
        super().__init__()
        self.conv = ConvReLU(in_channels, 128, 1, batch_norm=batch_norm)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x):
        if tuple(x.shape[-2:]) == (14, 14):  # the paper's 5x5/3 pool at 224; else adaptive
            x = F.avg_pool2d(x, 5, stride=3)
        else:
            x = F.adaptive_avg_pool2d(x, 4)
        x = torch.flatten(self.conv(x), 1)                    # N x 2048
        x = self.dropout(F.relu(self.fc1(x), inplace=True))   # N x 1024
        return self.fc2(x)                                    # N x num_classes

class GoogLeNet(nn.Module):
    """Logits [N, classes] in eval mode or without aux heads, else GoogLeNetOutputs."""

    def __init__(self, arch="tiny", num_classes=200, aux_logits=True, batch_norm=None, dropout=0.4,
                 aux_dropout=0.7):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
        bn = arch == "tiny" if batch_norm is None else batch_norm
        conv = functools.partial(ConvReLU, batch_norm=bn)
        if arch == "original":  # the paper's stem, with LRN unless BatchNorm replaces it
            lrn64 = [] if bn else [ChannelLRN(64)]
            lrn192 = [] if bn else [ChannelLRN(192)]
            self.stem = nn.Sequential(
                conv(3, 64, 7, stride=2), nn.MaxPool2d(3, 2, padding=1), *lrn64,
                conv(64, 64, 1), conv(64, 192, 3), *lrn192, nn.MaxPool2d(3, 2, padding=1))
        else:  # shrinks slower: the 224 stem would leave 2x2 maps at 5b from a 64x64 image
            self.stem = nn.Sequential(conv(3, 64, 3), nn.MaxPool2d(3, 2, padding=1),
                                      conv(64, 192, 3), nn.MaxPool2d(3, 2, padding=1))
        for name, row in INCEPTION_TABLE.items():  # self.inception3a ... self.inception5b
            setattr(self, f"inception{name}", Inception(*row, batch_norm=bn))
        self.maxpool3 = nn.MaxPool2d(3, 2, padding=1)
        self.maxpool4 = nn.MaxPool2d(3, 2, padding=1)
        self.aux1 = AuxClassifier(512, num_classes, bn, aux_dropout) if aux_logits else None  # 4a's
        self.aux2 = AuxClassifier(528, num_classes, bn, aux_dropout) if aux_logits else None  # 4d's
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = the paper's 7x7 average pool at 224
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stem(x)          # N x 192 x 28 x 28 from 224 / 16 x 16 from 64
        x = self.inception3a(x)   # N x 256 x 28 x 28
        x = self.inception3b(x)   # N x 480 x 28 x 28
        x = self.maxpool3(x)      # N x 480 x 14 x 14 / 8 x 8
        x = self.inception4a(x)   # N x 512 x 14 x 14
        use_aux = self.training and self.aux1 is not None
        aux1 = self.aux1(x) if use_aux else None
        x = self.inception4b(x)   # N x 512 x 14 x 14
        x = self.inception4c(x)   # N x 512 x 14 x 14
        x = self.inception4d(x)   # N x 528 x 14 x 14
        aux2 = self.aux2(x) if use_aux else None
        x = self.inception4e(x)   # N x 832 x 14 x 14
        x = self.maxpool4(x)      # N x 832 x 7 x 7 / 4 x 4
        x = self.inception5a(x)   # N x 832 x 7 x 7
        x = self.inception5b(x)   # N x 1024 x 7 x 7
        x = torch.flatten(self.avgpool(x), 1)  # N x 1024
        logits = self.fc(self.dropout(x))      # N x num_classes
        return GoogLeNetOutputs(logits, aux1, aux2) if use_aux else logits

def init_weights(model):
    """Kaiming-normal convs: fan_out before BatchNorm, fan_in without (fan_out went NaN there)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is None:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)

def build_model(arch, num_classes, **options):
    """A GoogLeNet; options: aux_logits, batch_norm (None: on for tiny), dropout, aux_dropout."""
    return GoogLeNet(arch, num_classes, **options)

# ---------------------------------------------------------------------------------------------
# Data: datasets listed from disk, decoded into uint8 stores, augmented per batch on the device
# ---------------------------------------------------------------------------------------------

DATASETS = ("tiny", "cifar10", "folder", "synthetic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

@dataclass
class Split:
    """One split before decoding: image files, or uint8 arrays [N, H, W, 3] (CIFAR, synthetic)."""
    labels: list
    files: list | None = None
    arrays: np.ndarray | None = None

    def __len__(self):
        return len(self.labels)

    def source(self, i):  # what decode_image reads
        from PIL import Image
        return self.files[i] if self.files is not None else Image.fromarray(self.arrays[i])

    def take(self, index):
        labels = [self.labels[i] for i in index]
        if self.files is not None:
            return Split(labels, files=[self.files[i] for i in index])
        return Split(labels, arrays=self.arrays[index])

    def subset(self, n):
        """n items evenly spaced in label order: each class keeps its share, within one."""
        if not n or n >= len(self):
            return self
        by_label = np.argsort(self.labels, kind="stable")
        return self.take(np.sort(by_label[np.linspace(0, len(self) - 1, n).astype(int)]))

@dataclass
class DatasetInfo:
    """A dataset's splits and what a checkpoint must remember about it."""
    name: str
    train: Split
    val: Split
    class_names: list          # short human names, for display
    class_ids: list            # wnids / folder names / CIFAR names
    mean: tuple
    std: tuple
    source_size: int           # decoded to this square size, then augmented on the device

def decode_image(source, size, max_pixels=None):
    """A path or PIL image as uint8 [3, size, size]: upright, RGB, centre-cropped."""
    from PIL import Image, ImageOps
    name = getattr(source, "filename", None) or str(source)
    try:
        if not isinstance(source, Image.Image):
            with Image.open(source) as image:
                return decode_image(image, size, max_pixels)
        source.draft("RGB", (size, size))  # JPEG: decoded at a reduced scale when it is huge
        if max_pixels and source.width * source.height > max_pixels:
            raise ImageTooLargeError(f"image {Path(name).name} is too large: > {max_pixels} pixels")
        image = ImageOps.exif_transpose(source)
        if image.mode[0] in "IF":  # 16/32-bit gray by its peak (0..1 floats stay): convert() clips
            values = np.asarray(image, dtype=np.float32) * 255 / max(np.max(image), 1.0)
            image = Image.fromarray(values.clip(0, 255).astype(np.uint8), "L")
        if image.has_transparency_data:
            white = Image.new("RGBA", image.size, "white")
            image = Image.alpha_composite(white, image.convert("RGBA"))
        image = ImageOps.fit(image.convert("RGB"), (size, size), Image.BILINEAR)
    except Image.DecompressionBombError as e:  # PIL's own limit, checked at open before ours
        raise ImageTooLargeError(f"image {Path(name).name} is too large: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"cannot decode image {name}: {e}") from None
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

def _image_files(folder, classes):  # the images in folder/<class>/ and below, sorted, labelled
    found = [(str(p), label) for label, name in enumerate(classes)
             for p in sorted((folder / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    return Split([label for _, label in found], files=[path for path, _ in found])

def find_tiny_imagenet(data_dir):  # data_dir or data_dir/tiny-imagenet-200, with wnids.txt; or None
    candidates = (Path(data_dir), Path(data_dir) / "tiny-imagenet-200")
    return next((folder for folder in candidates if (folder / "wnids.txt").is_file()), None)

def download_tiny_imagenet(data_dir, url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                           md5="90528d7ca1a48142e341f4ef8d21d0de"):
    """The zip, md5-checked, extracted into data_dir (load_tiny_imagenet finds a cut-short one)."""
    from torchvision.datasets.utils import download_and_extract_archive
    if find_tiny_imagenet(data_dir):
        return
    try:
        download_and_extract_archive(url, str(data_dir), md5=md5, remove_finished=True)
    except Exception as e:  # network errors come in many types; the message is what matters
        (Path(data_dir) / Path(url).name).unlink(missing_ok=True)  # partial, or not the md5's
        raise UserError(f"downloading {url} failed ({e}): check connection and md5 {md5}") from None

def _lines(path):  # a text file's lines, none if it is missing
    return path.read_text().splitlines() if path.is_file() else []

def load_tiny_imagenet(data_dir, download=False):
    """Tiny ImageNet as it comes: classes by sorted wnids.txt, val labels from its annotations."""
    if download:
        download_tiny_imagenet(data_dir)
    root = find_tiny_imagenet(data_dir)
    if root is None:
        raise UserError(f"no Tiny ImageNet in {data_dir} (expected wnids.txt): add --download")
    wnids = sorted((root / "wnids.txt").read_text().split())
    train = _image_files(root / "train", wnids)
    rows = [line.split("\t")[:2] for line in _lines(root / "val" / "val_annotations.txt")]
    if not rows or len(set(train.labels)) < len(wnids) or {w for _, w in rows} - set(wnids):
        raise UserError(f"Tiny ImageNet at {root} is incomplete: remove it, rerun with --download")
    label_of = {wnid: label for label, wnid in enumerate(wnids)}  # 10,000 rows: no list search
    val = Split([label_of[wnid] for _, wnid in rows],
                files=[str(root / "val" / "images" / name) for name, _ in rows])
    words = dict(line.split("\t", 1) for line in _lines(root / "words.txt"))  # wnid \t "a, b"
    names = [words.get(w, w).split(",")[0].strip() for w in wnids]
    return DatasetInfo("tiny", train, val, names, wnids, IMAGENET_MEAN, IMAGENET_STD, 64)

def load_image_folder(data_dir, image_size):
    """data_dir/train/<class>/<image> and data_dir/val/ (or test/) in the same layout."""
    root = Path(data_dir)
    classes = sorted(p.name for p in (root / "train").glob("*") if p.is_dir())
    train = _image_files(root / "train", classes)
    val = _image_files(root / "val" if (root / "val").is_dir() else root / "test", classes)
    if not train.files or not val.files:
        raise UserError(f"--dataset folder expected {root}/train/<class>/, val/<class>/ (or test/)")
    return DatasetInfo("folder", train, val, classes, classes, IMAGENET_MEAN, IMAGENET_STD,
                       image_size)

def load_cifar10(data_dir, download=False):
    from torchvision.datasets import CIFAR10
    try:
        train = CIFAR10(str(data_dir), train=True, download=download)
        val = CIFAR10(str(data_dir), train=False, download=download)
    except (RuntimeError, OSError) as e:  # not there (RuntimeError), or the download failed
        raise UserError(f"no CIFAR-10 in {data_dir} ({e}): add --download to fetch it") from None
    return DatasetInfo("cifar10", Split(list(train.targets), arrays=train.data),
                       Split(list(val.targets), arrays=val.data), train.classes,
                       list(train.classes), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32)

def make_synthetic(image_size, num_classes=10, train_size=2048, val_size=512, seed=0):
    """Learnable images for smoke tests: a random 4x4 pattern per class, plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = 0.7 * F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), image_size)
    labels = torch.randint(num_classes, (train_size + val_size,), generator=g)
    images = patterns[labels]
    images += 0.3 * torch.rand(images.shape, generator=g)
    both = Split(labels.tolist(), arrays=(images * 255).byte().permute(0, 2, 3, 1).numpy())
    names = [f"pattern {i}" for i in range(num_classes)]
    val = both.take(range(train_size, len(both)))
    return DatasetInfo("synthetic", both.take(range(train_size)), val, names, names, (0.5,) * 3,
                       (0.25,) * 3, image_size)

def load_dataset(name, data_dir, image_size=64, download=False):
    """DatasetInfo for "tiny", "cifar10", "folder" or "synthetic" (nothing decoded yet)."""
    loaders = {"tiny": lambda: load_tiny_imagenet(data_dir, download),
               "cifar10": lambda: load_cifar10(data_dir, download),
               "folder": lambda: load_image_folder(data_dir, image_size),
               "synthetic": lambda: make_synthetic(image_size)}
    info = loaders[name]()
    if len(info.class_names) < 2:
        raise UserError(f"{data_dir}: {len(info.class_names)} class; a classifier needs at least 2")
    return info

@dataclass
class ImageStore:
    """Decoded images [N, 3, S, S] uint8 and their labels [N] int64, in memory."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    @property
    def size(self):  # S
        return self.images.shape[-1]

@dataclass
class DecodedImages(torch.utils.data.Dataset):
    """Item i: (uint8 image, label, ""), or (zeros, label, the error's line) for a bad image."""
    split: Split
    size: int

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            return decode_image(self.split.source(i), self.size), self.split.labels[i], ""
        except ImageDecodeError as e:
            return torch.zeros(3, self.size, self.size).byte(), self.split.labels[i], str(e)

    def batches(self, index_lists, workers=0):
        """(images, labels, errors) of each list of indices, decoded by `workers` processes."""
        context = None  # the platform's default (spawn on macOS and Windows)
        if workers and sys.platform == "linux":  # fork: a script with no __main__ guard works
            context = "fork"
        return torch.utils.data.DataLoader(
            self, batch_sampler=index_lists, num_workers=workers, worker_init_fn=_worker_signals,
            multiprocessing_context=context, generator=torch.Generator())  # not the global RNG

def _worker_signals(worker_id):  # the inherited SIGTERM handler only set a flag: workers hung on
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def _stop_at_bad_image(errors):  # DecodedImages' lines of a batch: the first bad image stops
    for error in filter(None, errors):
        raise UserError(f"{error}; remove it from the dataset")

def build_store(split, size, workers=0, split_name="train", log=print):
    """split as an ImageStore, decoded by `workers` processes straight into one uint8 tensor."""
    labels = torch.tensor(split.labels, dtype=torch.int64)
    if split.arrays is not None and split.arrays.shape[1] == size:  # taken as they are
        return ImageStore(torch.from_numpy(split.arrays).permute(0, 3, 1, 2).contiguous(), labels)
    start = time.perf_counter()
    images = torch.empty((len(split), 3, size, size), dtype=torch.uint8)
    chunks = [range(i, min(i + 32, len(split))) for i in range(0, len(split), 32)]
    decoded = DecodedImages(split, size).batches(chunks, workers)
    for chunk, (batch, _, errors) in zip(chunks, decoded):
        raise_if_stopped()  # a stop ends it within a batch of 32
        _stop_at_bad_image(errors)
        images[chunk.start:chunk.stop] = batch
    log(f"{split_name}: decoded {len(split)} images to {size}x{size} in "
        f"{time.perf_counter() - start:.1f}s ({images.nbytes / 2**20:.0f} MiB)")
    return ImageStore(images, labels)

def _resample_matrix(scale, offset, out_size, in_size):
    """[B, out, in] bilinear weights: out pixel o reads at scale * o + offset (affine_grid's)."""
    out_pos = (torch.arange(out_size, device=scale.device) + 0.5) / out_size * 2 - 1
    src = ((scale[:, None] * out_pos[None, :] + offset[:, None]) + 1) * (in_size / 2) - 0.5
    # Half a pixel past the border is still inside, clamped (as F.interpolate: no dark edges)
    src = torch.where((src >= -0.5) & (src <= in_size - 0.5), src.clamp(0, in_size - 1), src)
    return (1 - (src[:, :, None] - torch.arange(in_size, device=scale.device)).abs()).clamp(min=0)

def _resample(images, params, out_size):
    """Crop, flip, resize by params [B, 4] = (sx, sy, tx, ty) as matmuls (fast on XLA too)."""
    b, c, h, w = images.shape
    rows = _resample_matrix(params[:, 1], params[:, 3], out_size, h)   # B x out x H
    cols = _resample_matrix(params[:, 0], params[:, 2], out_size, w)   # B x out x W
    x = images.permute(0, 2, 1, 3).reshape(b, h, c * w).float()        # channels ride along
    x = torch.bmm(rows, x).view(b, out_size * c, w)
    x = torch.bmm(x, cols.transpose(1, 2))                             # B x out*C x out
    return x.view(b, out_size, c, out_size).permute(0, 2, 1, 3).contiguous()

@functools.lru_cache
def _on_device(values, device):  # once per device: made in the step, a blocking copy every step
    return torch.tensor(values, dtype=torch.float32).to(device)

def _normalize(x, mean, std):  # 0..255 floats -> (x / 255 - mean) / std
    mean = _on_device(tuple(mean), x.device).view(1, 3, 1, 1)
    std = _on_device(tuple(std), x.device).view(1, 3, 1, 1)
    return x * (1 / (255 * std)) - mean / std

def _shift_crop(images, params):
    """The pad crop (whole-pixel shifts, zero fill, flips) as one gather: _resample's numbers."""
    b, c, h, w = images.shape
    dx = torch.round(params[:, 2] * (w / 2)).long()
    dy = torch.round(params[:, 3] * (h / 2)).long()
    xs = torch.arange(w, device=images.device)
    cols = torch.where(params[:, :1] < 0, w - 1 - xs, xs) + dx[:, None]         # B x W
    rows = torch.arange(h, device=images.device)[None, :] + dy[:, None]          # B x H
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    flat = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = images.reshape(b, c, h * w).gather(2, flat.view(b, 1, h * w).expand(b, c, h * w))
    return out.view(b, c, h, w) * valid[:, None]

def _resize(x, size):  # by _resample: one op and the same numbers on CPU, CUDA and XLA
    if x.shape[-1] == size:
        return x.float()
    return _resample(x, _on_device((1.0, 1.0, 0.0, 0.0), x.device).expand(x.shape[0], 4), size)

def train_transform(images, params, image_size, mean, std, crop="pad"):
    """A uint8 batch [B, 3, S, S] augmented on its device by params from random_crop_params."""
    if crop == "pad":  # shifted and flipped at S, then resized
        return _normalize(_resize(_shift_crop(images, params), image_size), mean, std)
    return _normalize(_resample(images, params, image_size), mean, std)

def eval_transform(images, config):
    """What validation and inference do to a uint8 batch [N, 3, S, S]: resize, normalise."""
    return _normalize(_resize(images, config.image_size), config.mean, config.std)

def random_crop_params(generator, batch_size, source_size, crop="pad", min_scale=0.25, attempts=10):
    """Per-image (sx, sy, tx, ty): a flip and shifts by up to 1/8 (pad) or RandomResizedCrop's."""
    flip = torch.where(torch.rand(batch_size, generator=generator) < 0.5, -1.0, 1.0)
    if crop == "pad":
        pad = max(1, source_size // 8)
        pixels = torch.randint(-pad, pad + 1, (batch_size, 2), generator=generator)
        shift = pixels.float() * 2 / source_size
        return torch.stack([flip, torch.ones(batch_size), shift[:, 0], shift[:, 1]], 1)
    # torchvision's areas and aspects, all attempts drawn at once (the generator advances the same
    # every batch): the first that fits wins; none fits: the whole image, as torchvision.
    area = min_scale + (1 - min_scale) * torch.rand(batch_size, attempts, generator=generator)
    log_ratio = (torch.rand(batch_size, attempts, generator=generator) * 2 - 1) * math.log(4 / 3)
    sx = torch.sqrt(area * torch.exp(log_ratio))
    sy = torch.sqrt(area / torch.exp(log_ratio))
    fits = (sx <= 1) & (sy <= 1)
    first = fits.float().argmax(1, keepdim=True)
    sx = torch.where(fits.any(1), sx.gather(1, first)[:, 0], 1.0)
    sy = torch.where(fits.any(1), sy.gather(1, first)[:, 0], 1.0)
    tx = (torch.rand(batch_size, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(batch_size, generator=generator) * 2 - 1) * (1 - sy)
    return torch.stack([sx * flip, sy, tx, ty], 1)

@dataclass(eq=False)
class StoreLoader:
    """Replica `rank`'s (uint8 images, labels, crop params or, in validation, mask) batches."""
    store: ImageStore | DecodedImages
    batch_size: int
    train: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    crop: str = "pad"
    device: torch.device | str | None = None  # where each epoch's params or masks go
    workers: int = 0
    epoch: int = dataclasses.field(default=0, init=False)

    def __post_init__(self):
        if self.train and len(self) == 0:
            raise UserError(f"{len(self.store)} images make no full batch of {self.batch_size} "
                            f"for each of {self.world_size} processes: lower --batch-size")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):  # training drops the last partial batch (fixed shapes), validation pads it
        if self.train:
            return len(self.store) // self.world_size // self.batch_size
        return math.ceil(len(self.store) / (self.world_size * self.batch_size))

    def __iter__(self):
        padded = len(self) * self.batch_size
        if self.train:  # one (seed, epoch) permutation split by the replicas, crops of their own
            seed = self.seed * 100_003 + self.epoch
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(self.store), generator=generator)[self.rank * padded:]
            if self.rank:
                generator.manual_seed(seed + 1_000_003 * self.rank)
            extras = torch.stack([random_crop_params(generator, self.batch_size, self.store.size,
                                                     self.crop) for _ in range(len(self))])
        else:  # this replica's images, padded; the mask marks the real ones
            order = torch.arange(self.rank, len(self.store), self.world_size)
            extras = (torch.arange(padded) < len(order)).float().view(len(self), self.batch_size)
            order = torch.cat([order, order.new_zeros(padded - len(order))])
        batches = order[:padded].view(len(self), self.batch_size)
        if isinstance(self.store, ImageStore):
            index = batches.to(self.store.images.device)
            fetched = ((self.store.images[i], self.store.labels[i], ()) for i in index)
        else:
            fetched = self.store.batches(batches.tolist(), self.workers)
        for extra, (images, labels, errors) in zip(extras.to(self.device), fetched):
            _stop_at_bad_image(errors)
            yield images, labels, extra

def make_loaders(info, batch_size, loader="fast", crop="pad", workers=0, subset=0, seed=0, rank=0,
                 world_size=1, log=print, need_train=True, store_device=None, device=None):
    """(train_loader or None, val_loader); fast: stores decoded once onto store_device (or host)."""

    def make_store(split, name):
        split = split.subset(subset)
        if loader == "fast":
            store = build_store(split, info.source_size, workers, name, log)
            return ImageStore(store.images.to(store_device), store.labels.to(store_device))
        return DecodedImages(split, info.source_size)

    train = None
    if need_train:
        train = StoreLoader(make_store(info.train, "train"), batch_size, True, seed, rank,
                            world_size, crop, device, workers)
    val_store = make_store(info.val, "val")
    val_batch = min(batch_size, max(1, math.ceil(len(val_store) / world_size)))  # no batch of pads
    return train, StoreLoader(val_store, val_batch, False, seed, rank, world_size, workers=workers)

# ---------------------------------------------------------------------------------------------
# Device: where training runs (CUDA, XLA, CPU), precision, and how processes talk (DDP, XLA)
# ---------------------------------------------------------------------------------------------

@dataclass
class Device:
    """Where training runs, this process's shard, and how processes talk (ddp, xla or None)."""
    kind: str
    torch_device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: str | None = None
    note: str = ""  # said in the device line: why XLA runs on the CPU

class Stopped(UserError):
    """SIGTERM or Ctrl-C: the run stopped, after saving where it was once training had begun."""

    def __init__(self, message, signum=signal.SIGTERM):  # a default: unpickled from a TPU process
        super().__init__(message)
        self.exit_code = 128 + signum

STOP = {"signal": None}  # the first SIGTERM or Ctrl-C; set by the handler, never cleared

def _request_stop(signum, frame):
    if signum == signal.SIGINT and STOP["signal"] is not None:
        raise KeyboardInterrupt  # a second Ctrl-C: quit now
    STOP["signal"] = signum

def install_stop_handlers():
    """SIGTERM and a first Ctrl-C set STOP (the run stops at its next check); main thread only."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _request_stop)

def _stopped(checkpoint_dir, where):
    signum = STOP["signal"] or signal.SIGTERM  # (another process got it)
    message = f"stopped by {signal.Signals(signum).name} {where}"
    if checkpoint_dir is not None:
        message += f": saved in {Path(checkpoint_dir) / LAST_FILE}; continue with --resume"
    return Stopped(message, signum)

def raise_if_stopped(what="before training began: nothing new was saved"):
    if STOP["signal"] is not None:
        raise _stopped(None, what)

class _MainThreadStopHandlers:
    """Unpickled in each TPU process's main thread, it installs the handlers there (torch_xla 2.9's
    launcher trains in a worker thread)."""
    def __reduce__(self):
        return (install_stop_handlers, ())

def _forward_to_children(signum, frame):  # the TPU launcher's process: its children stop and save
    for child in multiprocessing.active_children():
        os.kill(child.pid, signum)

def resolve_device_kind(requested):
    """auto, cuda, xla or cpu -> the kind to train on (XLA: the TPU unless PJRT_DEVICE says)."""
    import importlib.util
    pjrt_device = os.environ.get("PJRT_DEVICE")  # as set: torch_xla's import may default it
    tpu = pjrt_device or list(Path("/dev").glob("accel*"))
    if requested == "auto" and torch.cuda.is_available():
        return "cuda"
    if requested == "auto":
        return "xla" if tpu and importlib.util.find_spec("torch_xla") else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA GPU; use --device cpu or auto")
    if requested == "xla" and importlib.util.find_spec("torch_xla") is None:
        raise UserError("--device xla needs torch_xla: pip install 'torch_xla[tpu]==2.9.0' (for "
                        "torch 2.9.x), then set PJRT_DEVICE=TPU (or CPU)")
    if requested == "xla" and not tpu:
        raise UserError("--device xla: PJRT_DEVICE is not set and this machine has no TPU: set "
                        "PJRT_DEVICE=TPU on a TPU VM, PJRT_DEVICE=CPU to try XLA on the CPU")
    if requested == "xla":
        os.environ["PJRT_DEVICE"] = pjrt_device or "TPU"
    return requested

def make_device(kind):
    """The Device of a kind; under torchrun it joins the process group, one GPU per process."""
    import torch.distributed as dist
    if kind == "xla":
        import torch_xla
        import torch_xla.runtime as xr
        on_cpu = os.environ.get("PJRT_DEVICE", "").upper() == "CPU"
        note = "on the CPU: PJRT_DEVICE=CPU" if on_cpu else ""
        world_size = xr.world_size()
        distributed = "xla" if world_size > 1 else None
        return Device("xla", torch_xla.device(), xr.global_ordinal(), world_size, distributed, note)
    if kind == "cuda":  # the fastest convolutions for the fixed shapes; TF32 for fp32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    if "LOCAL_RANK" not in os.environ:  # not under torchrun
        return Device(kind, torch.device(kind))
    torch_device = torch.device("cpu")
    if kind == "cuda":
        torch_device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return Device(kind, torch_device, dist.get_rank(), dist.get_world_size(), "ddp")

def cpu_has_native_bf16():
    """avx512_bf16 or AMX, by PyTorch's own probes."""
    return torch._C._cpu._is_avx512_bf16_supported() or torch._C._cpu._is_amx_tile_supported()

def resolve_precision(precision, device):
    """auto: bf16 where native (CUDA 8.0+, TPU, avx512_bf16 or AMX), fp16 on older GPUs, or fp32."""
    if precision != "auto":
        return precision
    if device.kind == "cuda":
        old = torch.cuda.get_device_capability(device.torch_device) < (8, 0)
        return "fp16" if old else "bf16"
    if device.kind == "xla":
        return "fp32" if device.note else "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"

def seed_everything(seed, device):
    seed = seed + 7919 * device.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.kind == "xla":  # torch.manual_seed does not reach the XLA generator
        import torch_xla.core.xla_model as xm
        xm.set_rng_state(seed, device=device.torch_device)

def device_batches(loader, device):
    if device.kind == "xla":
        import torch_xla.distributed.parallel_loader as pl
        yield from pl.MpDeviceLoader(loader, device.torch_device)
        return
    for batch in loader:
        yield tuple(t.to(device.torch_device, non_blocking=device.kind == "cuda") for t in batch)

def zeros_on(device, n):  # made on the host: on XLA a device-side zeros is a graph of its own
    return torch.zeros(n).to(device.torch_device)

def all_reduce_sum(tensor, device):
    if device.distributed == "xla":
        import torch_xla.core.xla_model as xm
        return xm.all_reduce(xm.REDUCE_SUM, tensor)
    if device.distributed == "ddp":
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor

def any_process(flag, device):
    """Whether flag is true in any process: one collective, so also a barrier."""
    if device.world_size == 1:
        return bool(flag)
    return all_reduce_sum(zeros_on(device, 1) + flag, device).item() > 0

def gather_rng_states(device):
    """Every process's random states as JSON values, a dict per rank (one collective): a resumed
    epoch draws the same dropout and crops from them as the stopped one would have."""
    mine = {"cpu": torch.get_rng_state().tolist()}
    if device.torch_device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device.torch_device).tolist()
    if device.kind == "xla":
        import torch_xla.core.xla_model as xm
        mine["xla"] = xm.get_rng_state(device.torch_device)  # a uint64
    if device.distributed == "xla":
        return xm.mesh_reduce("rng_states", mine, list)
    states = [mine] * device.world_size
    if device.distributed == "ddp":
        torch.distributed.all_gather_object(states, mine)
    return states

def restore_rng_states(states, device):
    """This process's dict of gather_rng_states' (saved by a run of the same shape)."""
    mine = states[device.rank]
    torch.set_rng_state(torch.tensor(mine["cpu"], dtype=torch.uint8))
    if "cuda" in mine:  # (the saving run's device kind was this run's)
        torch.cuda.set_rng_state(torch.tensor(mine["cuda"], dtype=torch.uint8), device.torch_device)
    if "xla" in mine:
        import torch_xla
        import torch_xla.core.xla_model as xm
        xm.set_rng_state(mine["xla"], device.torch_device)
        # Each sync advances XLA's seed. The stopped run's next step came after one more sync (the
        # loader's, after the check's that this state was read at): this is that sync.
        torch_xla.sync()

def first_on_each_node(device, fn):
    """fn(True) on each node's first process (LOCAL_RANK 0), then fn(False) on the others."""
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    result = fn(True) if first else None
    if device.distributed == "ddp":
        any_process(False, device)  # a barrier
    return result if first else fn(False)

def average_buffers(model, device):
    if device.world_size > 1:
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.copy_(all_reduce_sum(buffer, device) / device.world_size)

# ---------------------------------------------------------------------------------------------
# Train / evaluate: the recipe, the step, the epoch, the run, evaluation, prediction
# ---------------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "paper")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

@dataclass
class TrainConfig:
    """The recipe: Nesterov SGD, warmup then cosine (paper: x0.96 per 8 epochs), label smoothing."""
    epochs: int = 30
    batch_size: int = 128             # per process: the global batch is this x processes
    lr: float = 0.2                   # the peak, per 256 images of the global batch
    schedule: str = "cosine"
    warmup_epochs: float = 2.0        # at most epochs / 4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    aux_weight: float = 0.3           # loss = main + aux_weight x (aux1 + aux2)
    crop: str = "pad"                 # or "resized"
    precision: str = "auto"           # see resolve_precision
    compile: bool | str = False       # torch.compile the step (a string: its backend)
    tta: bool = False                 # validation: mean logits of each image and its mirror
    seed: int = 0
    log_interval: int = 50            # steps between progress lines, or ~30 s (0: none)

def peak_lr(config, world_size=1):
    return config.lr * config.batch_size * world_size / 256

def learning_rate(config, epoch, step, steps_per_epoch, world_size=1):
    """The lr of a step: a pure function of where the run is, so a resume continues it exactly."""
    peak = peak_lr(config, world_size)
    progress = epoch + step / steps_per_epoch
    warmup = min(config.warmup_epochs, config.epochs / 4)  # a short run still gets to decay
    if warmup and progress < warmup:
        return peak * min(1.0, (progress + 1 / steps_per_epoch) / warmup)
    if config.schedule == "paper":  # Szegedy et al.: -4% every 8 epochs
        return peak * 0.96 ** (epoch // 8)
    # Cosine, at the step's start: never 0 (on XLA a 0 would be one more compiled graph).
    decayed = min((progress - warmup) / max(config.epochs - warmup, 1e-9), 1.0)
    return peak * 0.5 * (1 + math.cos(math.pi * decayed))

def make_optimizer(model, config, device_kind="cpu"):
    """SGD; no weight decay on BatchNorm and biases (it only fights the normalisation)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    kernels = {"cuda": {"fused": True}, "cpu": {"foreach": True}}.get(device_kind, {})
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0, **kernels)
    if config.momentum and device_kind == "xla":  # zero momentum now: step 1 is every step's graph
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros(p.shape).to(p.device)
    return optimizer

def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr

# total: minimised; main, aux: the heads' plain cross-entropy (aux: mean), detached, for logs.
GoogLeNetLoss = namedtuple("GoogLeNetLoss", ["total", "main", "aux", "logits"])

def googlenet_loss(outputs, labels, aux_weight=0.3, label_smoothing=0.0):
    heads = list(outputs) if isinstance(outputs, GoogLeNetOutputs) else [outputs]
    losses = [F.cross_entropy(h, labels, label_smoothing=label_smoothing) for h in heads]
    total = losses[0] + aux_weight * sum(losses[1:])
    with torch.no_grad():
        plain = [F.cross_entropy(h.float(), labels) for h in heads]
        aux = sum(plain[1:], torch.zeros_like(plain[0])) / max(len(heads) - 1, 1)
    return GoogLeNetLoss(total, plain[0], aux, heads[0])

def _autocast(device, precision):
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.kind, dtype=dtype, enabled=precision != "fp32")

def make_grad_scaler(precision, device):
    return torch.amp.GradScaler(device.kind, enabled=precision == "fp16")

def uses_channels_last(device):  # faster convolutions, except on XLA (which picks its own layout)
    return device.kind != "xla"

class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite."""
    everywhere = True  # the processes decide it together, or share the weights

def _diverged(what, step, epoch, config):
    return TrainingDiverged(f"the {what} became non-finite by step {step} of epoch {epoch + 1}: "
                            f"lower --lr (now {config.lr} per 256 images) or use --precision "
                            f"fp32; the checkpoints saved before are kept")

def weights_finite(model):
    sums = torch.stack([p.detach().float().sum() for p in model.parameters()])
    return bool(torch.isfinite(sums).all())

# What train_step adds up on the device, in one tensor (main / aux_loss: the loss x images).
SUMS = ("main_loss", "aux_loss", "correct", "images")

def train_step(step_model, optimizer, scaler, batch, sums, model_config, config, device, precision):
    """One step, adding its SUMS to `sums`; reads nothing back."""
    images, labels, crop_params = batch
    if images.dtype == torch.uint8:  # the fast loader's: augmented on the device
        images = train_transform(images, crop_params, model_config.image_size, model_config.mean,
                                 model_config.std, config.crop)
    if uses_channels_last(device):
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        loss = googlenet_loss(step_model(images), labels, config.aux_weight, config.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss.total).backward()
    if device.kind == "xla":  # on several TPU cores this all-reduces the gradients first
        import torch_xla.core.xla_model as xm
        xm.optimizer_step(optimizer)
    else:  # fp16's scaler unscales, and skips a step whose gradients overflowed (else plain)
        scaler.step(optimizer)
        scaler.update()
    n = labels.shape[0]
    # A non-finite loss to minimise (an aux head's too) makes the summed main loss non-finite.
    main = torch.where(torch.isfinite(loss.total.detach()), loss.main, torch.nan)
    correct = (loss.logits.argmax(1) == labels).sum().float()
    sums += torch.stack([main * n, loss.aux * n, correct, labels.new_full((), n).float()])

def _clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"

def _agree(sums, device):
    """(the SUMS of all processes, whether any was asked to stop): one all_reduce of one small
    tensor, so a NaN anywhere makes the summed loss NaN everywhere."""
    if device.kind == "xla":  # the step's graph ends here as at any other step: no new graph
        import torch_xla
        torch_xla.sync()
    stop = torch.tensor([float(STOP["signal"] is not None)]).to(sums.device)
    agreed = all_reduce_sum(torch.cat([sums, stop]), device).tolist()
    return dict(zip(SUMS, agreed)), agreed[-1] > 0

def _run_shape(device, config, steps):  # a position's step means the same images in a run alike
    return [device.kind, device.world_size, config.batch_size, steps]

def train_one_epoch(model, loader, optimizer, device, model_config, config, epoch, log=print,
                    step_model=None, scaler=None, position=None, stop_at=None):
    """One pass; SUMS add up on the device. At check points (every step on the CPU, else at
    progress lines and 4 times an epoch) the processes read them and agree on divergence and on a
    stop: stop_at(position) saves where the epoch is. position: a stopped epoch's place."""
    model.train()
    precision = resolve_precision(config.precision, device)
    scaler = scaler or make_grad_scaler(precision, device)
    steps = len(loader)
    interval = 1 if device.kind == "cpu" else max(1, min(config.log_interval or steps, steps // 4))
    sums = zeros_on(device, len(SUMS))
    first = (position or {}).get("step", 0)
    start = time.perf_counter()  # the epoch's: on resume earlier, by the seconds it had run
    logged = start - 10  # the first progress line after ~20 s
    if position:  # its sums are all processes': rank 0 carries them on
        sums += torch.tensor(position["sums"]).to(sums.device) * (device.rank == 0)
        start -= position["seconds"]
    batches = itertools.islice(device_batches(loader, device), first, None)
    for step, batch in enumerate(batches, first + 1):
        if position and step == first + 1:  # after the loader drew its seeds: dropout as it was
            restore_rng_states(position["rng"], device)
        lr = learning_rate(config, epoch, step - 1, steps, device.world_size)
        set_lr(optimizer, lr)
        train_step(step_model or model, optimizer, scaler, batch, sums, model_config, config,
                   device, precision)
        if step % interval and step < steps:
            continue
        now = time.perf_counter()
        totals, stop = _agree(sums, device)
        if not math.isfinite(totals["main_loss"]):
            raise _diverged("loss", step, epoch, config)
        if config.log_interval and (step % config.log_interval == 0 or now - logged >= 30):
            logged = now
            per_step = (now - start) / step
            log(f"epoch {epoch + 1} step {step}/{steps} loss "
                f"{totals['main_loss'] / totals['images']:.4f} lr {lr:.4g} | {_clock(now - start)} "
                f"elapsed, ETA epoch {_clock(per_step * (steps - step))} run "
                f"{_clock(per_step * (steps * (config.epochs - epoch) - step))}")
        if stop and step < steps and stop_at is not None:  # at the last step: after validation
            if not weights_finite(model):  # an update broke them after a finite loss: never save
                raise _diverged("weights", step, epoch, config)
            stop_at({"step": step, "sums": [totals[name] for name in SUMS], "seconds": now - start,
                     "shape": _run_shape(device, config, steps), "rng": gather_rng_states(device)})
    totals = dict(zip(SUMS, all_reduce_sum(sums, device).tolist()))
    images = max(totals["images"], 1)
    return {"train_loss": totals["main_loss"] / images,
            "train_aux_loss": totals["aux_loss"] / images,
            "train_top1": totals["correct"] / images, "train_images": int(images),
            "epoch_seconds": time.perf_counter() - start}

@torch.no_grad()
def evaluate(model, loader, device, model_config, precision="auto", tta=False):
    """Loss, top-1, top-5 over all validation images (padding masked, processes summed)."""
    model.eval()
    precision = resolve_precision(precision, device)
    sums = zeros_on(device, 4)  # loss, top1, top5, images
    for images, labels, mask in device_batches(loader, device):
        if images.dtype == torch.uint8:
            images = eval_transform(images, model_config)
        if uses_channels_last(device):
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, precision):
            logits = model(images).float()
            if tta:  # the mean with the mirror's
                logits = (logits + model(images.flip(3)).float()) / 2
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        loss = F.cross_entropy(logits, labels, reduction="none")
        top1_hits = (top5[:, 0] == labels).float()
        top5_hits = (top5 == labels[:, None]).any(1).float()
        per_image = torch.stack([loss, top1_hits, top5_hits, torch.ones_like(loss)])
        sums += (per_image * mask.float()).sum(1)
    loss, top1, top5, images = all_reduce_sum(sums, device).tolist()
    images = max(images, 1)
    return {"loss": loss / images, "top1": top1 / images, "top5": top5 / images,
            "images": int(images)}

def resume_point(checkpoint):
    """Where a checkpoint continues, counted as the stop line and the epoch lines count (from 1)."""
    done = checkpoint["config"]["epoch"]
    position = checkpoint.get("position") or {}
    if position.get("epoch") == done:
        return f"after step {position['step']} of epoch {done + 1}"
    return f"after epoch {done}"

def _resumed_position(resume, device, config, steps, log):
    """The checkpoint's mid-epoch position if it is in the epoch resumed and was saved by a run of
    this shape (then its step means the same images and lr), else None: the epoch restarts."""
    position = resume.get("position")
    if position is None or position["epoch"] != resume["config"]["epoch"]:
        return None
    here = _run_shape(device, config, steps)
    if position["shape"] != here:
        log(f"note: the position saved after step {position['step']} of epoch "
            f"{position['epoch'] + 1} is for (device, processes, batch, steps an epoch) "
            f"{position['shape']}, this run is {here}: the epoch restarts from its first step")
        return None
    return position

def _model_to_train(model, device, config):
    """What runs forward/backward (DDP, torch.compile); `model` keeps the weights' plain names."""
    model.to(device.torch_device)
    if uses_channels_last(device):
        model.to(memory_format=torch.channels_last)
    step_model = model
    if device.distributed == "ddp":
        device_ids = [device.torch_device.index] if device.kind == "cuda" else None
        step_model = nn.parallel.DistributedDataParallel(model, device_ids)
    if config.compile:  # a string names the backend; inductor makes no XLA code
        backend = {"xla": "openxla"}.get(device.kind, "inductor")
        if isinstance(config.compile, str):
            backend = config.compile
        step_model = torch.compile(step_model, backend=backend)
    return step_model

def _best(history):  # the record of the best validation top-1, the earliest of equals
    return max(history, key=lambda h: h["val_top1"], default=None)

def _checkpoints(out_dir, model, optimizer, scaler, model_config, config, history, argv):
    """Readies rank 0's folder; returns save(epoch, position=None): last with a position, or at an
    epoch's end best first if it is the best (a crash never loses it), last, metrics.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        for stale in out_dir.glob(f".{name}.*.tmp"):  # a save that a kill interrupted
            stale.unlink()
    if history:  # a kill after last, before metrics.jsonl
        write_metrics(out_dir / "metrics.jsonl", history)

    def save(epoch, position=None):
        best = _best(history) or {}
        model_config.epoch = epoch
        model_config.best_top1 = best.get("val_top1")
        model_config.best_epoch = best.get("epoch")
        name = LAST_FILE
        if position is None:
            model_config.val_top1 = history[-1]["val_top1"]
            if best is history[-1]:  # best first: a crash between the two never loses it
                name = BEST_FILE
        save_checkpoint(out_dir / name, model, optimizer, model_config, config, history, argv,
                        scaler, position)
        if name == BEST_FILE:  # last is the same file: copied, not gathered and serialized again
            best_bytes = (out_dir / BEST_FILE).read_bytes()
            _atomic_write(out_dir / LAST_FILE, lambda f: f.write(best_bytes))
        if position is None:
            write_metrics(out_dir / "metrics.jsonl", history)
    return save

def _stop_mid_epoch(save, device, epoch, checkpoint_dir, position):
    """train_one_epoch's stop_at: rank 0 saves the position in last; each process raises Stopped."""
    if save is not None:
        save(epoch, {"epoch": epoch, **position})
    any_process(True, device)  # a barrier: the others wait until rank 0 has written last
    raise _stopped(checkpoint_dir, f"after step {position['step']} of epoch {epoch + 1}")

def _epoch_record(epoch, result, val, config, device, steps, run_start):
    return {"epoch": epoch + 1, **result, **{f"val_{key}": value for key, value in val.items()},
            "val_tta": config.tta, "lr": learning_rate(config, epoch, 0, steps, device.world_size),
            "last_lr": learning_rate(config, epoch, steps - 1, steps, device.world_size),
            "train_images_per_second": result["train_images"] / result["epoch_seconds"],
            "elapsed_seconds": time.perf_counter() - run_start, "processes": device.world_size}

def train(model, train_loader, val_loader, model_config, config, device=None, checkpoint_dir=None,
          resume=None, argv=None, log=print):
    """Train to config.epochs, validating each; returns the history. resume: load_checkpoint's
    result (its weights already in model). SIGTERM / Ctrl-C: saves, raises Stopped."""
    install_stop_handlers()  # main() did already: this is for library callers
    raise_if_stopped()  # a stop that came while the data was read
    device = device or make_device(resolve_device_kind("auto"))
    run_start = time.perf_counter()
    steps = len(train_loader)
    step_model = _model_to_train(model, device, config)
    optimizer = make_optimizer(model, config, device.kind)
    scaler = make_grad_scaler(resolve_precision(config.precision, device), device)
    resume = resume or {"config": {"epoch": 0}, "history": [], "momentum": {}}
    start_epoch = resume["config"]["epoch"]
    history = list(resume["history"])
    for name, param in model.named_parameters():  # each in its parameter's layout
        if name in resume["momentum"]:
            buffer = torch.empty_like(param).copy_(resume["momentum"][name])
            optimizer.state[param]["momentum_buffer"] = buffer
    if resume.get("scaler") and scaler.is_enabled():  # fp16: the loss scale goes on
        scaler.load_state_dict(resume["scaler"])
    position = _resumed_position(resume, device, config, steps, log)
    save = None
    if checkpoint_dir is not None and device.rank == 0:
        save = _checkpoints(Path(checkpoint_dir), model, optimizer, scaler, model_config, config,
                            history, argv)
    if config.compile or device.kind == "xla":
        log("compiling the first training step (once, for minutes)")
    for epoch in range(start_epoch, config.epochs):
        seed_everything(config.seed * 1000 + epoch, device)
        if hasattr(train_loader, "set_epoch"):  # make_loaders' do; a caller's own may not
            train_loader.set_epoch(epoch)
        stop_at = functools.partial(_stop_mid_epoch, save, device, epoch, checkpoint_dir)
        result = train_one_epoch(model, train_loader, optimizer, device, model_config, config,
                                 epoch, log, step_model, scaler, epoch == start_epoch and position,
                                 stop_at)
        average_buffers(model, device)  # validate the BatchNorm statistics that are saved
        val = evaluate(model, val_loader, device, model_config, config.precision, config.tta)
        if not weights_finite(model):  # the last update can break them after a finite loss
            raise _diverged("weights", steps, epoch, config)
        history.append(_epoch_record(epoch, result, val, config, device, steps, run_start))
        r = history[-1]
        left = r["elapsed_seconds"] / (epoch + 1 - start_epoch) * (config.epochs - epoch - 1)
        log(f"epoch {epoch + 1}/{config.epochs} train loss {r['train_loss']:.4f} (aux "
            f"{r['train_aux_loss']:.4f}) top1 {r['train_top1']:.4f} | val loss {r['val_loss']:.4f} "
            f"top1 {r['val_top1']:.4f} top5 {r['val_top5']:.4f} {'(flip TTA) ' * config.tta}| lr "
            f"{r['lr']:.4g}->{r['last_lr']:.4g} | {r['epoch_seconds']:.1f}s "
            f"{r['train_images_per_second']:.0f} img/s | run ETA {_clock(left)}")
        if save is not None:
            save(epoch + 1)
        if any_process(STOP["signal"] is not None, device):  # in its last step or validation
            raise _stopped(checkpoint_dir, f"after epoch {epoch + 1}")
    best = _best(history)
    if save is not None and best is not None:
        log(f"done in {_clock(time.perf_counter() - run_start)}: best val top1 "
            f"{best['val_top1']:.4f} top5 {best['val_top5']:.4f} at epoch {best['epoch']}; "
            + ", ".join(str(Path(checkpoint_dir) / name) for name in CHECKPOINT_FILES))
    return history

def write_metrics(path, history):
    _atomic_write(path, lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()))

@torch.no_grad()
def predict_proba(model, config, images):
    """Class probabilities [N, classes] of a uint8 batch [N, 3, S, S] (S: config.source_size)."""
    model.eval()
    images = images.to(next(model.parameters()).device)
    return model(eval_transform(images, config)).float().softmax(1).cpu()

@torch.no_grad()
def predict_with_cam(model, config, images):
    """(class probabilities [N, num_classes], class activation maps [N, S, S] scaled to 0..1) of a
    uint8 batch [N, 3, S, S], from one forward pass. A map (Zhou et al. 2016): inception5b's output
    weighted by fc's row of the top class, upsampled bilinearly to S x S."""
    net = next(m for m in model.modules() if isinstance(m, GoogLeNet))  # also inside a wrapper
    features = []  # one call at a time per model (the demo runs one inference thread)
    hook = net.inception5b.register_forward_hook(lambda module, inputs, out: features.append(out))
    try:
        probs = predict_proba(model, config, images)
    finally:
        hook.remove()
    weights = net.fc.weight[probs.argmax(1).to(features[0].device)].float()  # N x 1024
    maps = torch.einsum("nc,nchw->nhw", weights, features[0].float())     # 7x7 / 4x4 / 2x2
    maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]
    low = maps.amin((1, 2), keepdim=True)
    span = maps.amax((1, 2), keepdim=True) - low
    return probs, ((maps - low) / span.clamp_min(1e-12)).cpu()


# ---------------------------------------------------------------------------------------------
# Checkpoint: atomic safetensors files, read at one boundary that checks each file whole
# ---------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "googlenet-checkpoint-v4"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
CHECKPOINT_FILES = (LAST_FILE, BEST_FILE, "metrics.jsonl")
MAX_IMAGE_SIZE = 1024  # a checkpoint's image sizes: larger ones take seconds and GBs per image
MAX_TEXT = 1000  # characters in a class name or a dataset's name

def printable(text):
    """text with each character a terminal acts on (controls, surrogates) as a \\x.. escape."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))

def _in(value, low, high, kinds=(int,)):  # a number of one of `kinds`, from low to high
    return type(value) in kinds and low <= value <= high

def _text(value):  # printable: no lone surrogates (unencodable), no terminal control characters
    return type(value) is str and len(value) <= MAX_TEXT and value.isprintable()

def _three(value, low, high):  # a mean or std as JSON gives it: three numbers
    return type(value) is list and len(value) == 3 and all(
        _in(v, low, high, (int, float)) for v in value)

@dataclass
class ModelConfig:
    """What a checkpoint says about its model and data: plain values, enough to rebuild it."""
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

    def check(self):
        """self, if each field has the type and range googlenet.py writes; else ValueError."""
        names, ids, options = self.class_names, self.class_ids, self.model_options
        fields = [
            ("arch", self.arch in ARCHS),
            ("num_classes", _in(self.num_classes, 2, 100_000)),
            ("class_names", type(names) is list and len(names) == self.num_classes
             and all(map(_text, names))),
            ("class_ids", type(ids) is list and all(_text(c) or _in(c, 0, 2**53) for c in ids)),
            ("image_size", _in(self.image_size, 8, MAX_IMAGE_SIZE)),
            ("source_size", _in(self.source_size, 8, MAX_IMAGE_SIZE)),
            ("mean/std", _three(self.mean, -10, 10) and _three(self.std, 1e-3, 10)),
            ("model_options", type(options) is dict and all(
                _text(k) and (v is None or _in(v, 0, 1, (bool, int, float)))
                for k, v in options.items())),
            ("dataset", _text(self.dataset)),
            ("epoch", _in(self.epoch, 0, 10**6)),
            ("best_epoch", self.best_epoch is None or _in(self.best_epoch, 0, 10**6)),
            ("best_top1", self.best_top1 is None or _in(self.best_top1, 0, 1, (int, float))),
            ("val_top1", self.val_top1 is None or _in(self.val_top1, 0, 1, (int, float)))]
        broken = [name for name, ok in fields if not ok]
        if broken:
            raise ValueError(f"its model config is not one googlenet.py writes: {broken[0]}")
        return self

def model_config_for(info, arch="tiny", image_size=None, **model_options):
    return ModelConfig(arch, len(info.class_names), list(info.class_names),
                       image_size or info.source_size, info.source_size, tuple(info.mean),
                       tuple(info.std), info.name, model_options, list(info.class_ids))

def _atomic_write(path, write):
    """write(file) to a temporary, fsync, rename over path; an OSError is a UserError line."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.urandom(6).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:  # a new file: the umask's permissions, as any the user writes
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}): free space, or another "
                        f"--checkpoint-dir; the files already there are intact") from None
    finally:
        with contextlib.suppress(OSError):  # on a read-only disk even a missing file's unlink fails
            tmp.unlink(missing_ok=True)

def save_checkpoint(path, model, optimizer, model_config, train_config=None, history=None,
                    argv=None, scaler=None, position=None):
    """An atomic safetensors file: the weights and momentum as tensors, the rest as JSON."""
    from safetensors.torch import save
    state = getattr(optimizer, "state", {})
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    tensors.update({f"momentum.{name}": state.get(p, {}).get("momentum_buffer")
                    for name, p in model.named_parameters()})
    metadata = {"config": dataclasses.asdict(model_config), "history": history, "argv": argv,
                "train_config": train_config and dataclasses.asdict(train_config),
                "position": position, "scaler": scaler and scaler.state_dict(),
                "torch_version": torch.__version__}
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items() if t is not None}
    metadata = {key: json.dumps(value) for key, value in metadata.items() if value}  # not [], {}
    _atomic_write(path, lambda f: f.write(save(tensors, {"format": CHECKPOINT_FORMAT, **metadata})))

def _json_number(text, kind=float):  # 20 digits: a uint64 (XLA's random seed) fits
    if kind is int and len(text.lstrip("-")) > 20 or not math.isfinite(kind(text)):
        raise ValueError(f"the number {text[:30]} is out of range")
    return kind(text)

# Each metadata entry's type (and its items'); all but the config (a schema) are used as saved
_ENTRIES = {"config": (dict, None), "train_config": (dict, None), "scaler": (dict, None),
            "position": (dict, None), "torch_version": (str, None), "history": (list, dict),
            "argv": (list, str)}

def _read_metadata(file):
    """Metadata by one bounded JSON parse, its types and schema; then the tensor table fits it."""
    metadata = file.metadata() or {}
    if metadata.pop("format", None) != CHECKPOINT_FORMAT:
        raise ValueError(f"not a googlenet.py checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    checkpoint = {"format": CHECKPOINT_FORMAT, "config": {}, "train_config": None, "history": [],
                  "argv": [], "scaler": None, "position": None}
    for key, text in metadata.items():
        try:
            value = json.loads(text, parse_int=functools.partial(_json_number, kind=int),
                               parse_float=_json_number, parse_constant=_json_number)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"its {key!r:.60} is not the JSON googlenet.py writes ({e})") from None
        kind, item = _ENTRIES.get(key, (None, None))
        if type(value) is not kind or item and any(type(v) is not item for v in value):
            raise ValueError(f"its {key!r:.60} is not an entry of the type googlenet.py writes")
        checkpoint[key] = value
    config = ModelConfig(**checkpoint["config"]).check()  # none: "missing 7 arguments"
    with torch.device("meta"):  # shapes only: a claim of 100,000 classes costs nothing
        net = build_model(config.arch, config.num_classes, **config.model_options)
    dtypes = {torch.float32: "F32", torch.int64: "I64"}  # safetensors' names of the dtypes
    required = {f"model.{k}": (dtypes[v.dtype], list(v.shape)) for k, v in net.state_dict().items()}
    optional = {f"momentum.{k}": ("F32", list(p.shape)) for k, p in net.named_parameters()}
    expected = {**optional, **required}
    found = {n: (file.get_slice(n).get_dtype(), file.get_slice(n).get_shape()) for n in file.keys()}
    misfit = sorted(set(required) - set(found))
    misfit += sorted(name for name, kind in found.items() if expected.get(name) != kind)
    if misfit:
        raise ValueError(f"its tensors do not fit its config: {misfit[0]!r:.80} of {len(misfit)}")
    return {**checkpoint, "config": dataclasses.asdict(config)}

def load_checkpoint(path):
    """Read a checkpoint at one boundary: anything odd, and any OSError, is one CheckpointError."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as file:  # copied out: a map faults once the file is rewritten
            checkpoint = _read_metadata(file)
            tensors = {name: file.get_tensor(name).clone() for name in sorted(file.keys())}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({str(e)[:200]}): pass a "
                              f"{LAST_FILE} or {BEST_FILE} that `python googlenet.py` wrote "
                              f"(earlier versions' .pt files are not read)") from None
    except (TypeError, ValueError) as e:  # the metadata's, the config's, the tensor table's
        raise CheckpointError(f"{path}: {str(e)[:200]}; use a file googlenet.py wrote") from None
    checkpoint.update(model={}, momentum={})
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {name} is NaN or infinite; use an earlier checkpoint")
        section, _, key = name.partition(".")  # model. or momentum.
        checkpoint[section][key] = tensor
    return checkpoint

def model_from_checkpoint(checkpoint):
    config = ModelConfig(**checkpoint["config"])  # checked when read: exactly its fields
    model = build_model(config.arch, config.num_classes, **config.model_options)
    model.load_state_dict(checkpoint["model"])
    return model, config

def load_for_inference(path, device="cpu"):
    """(model in eval mode on `device`, ModelConfig) from a checkpoint; classify: predict_proba."""
    model, config = model_from_checkpoint(load_checkpoint(path))
    return model.to(device).eval(), config

# ---------------------------------------------------------------------------------------------
# CLI: flags -> the library calls above; a bad flag (argparse's usage) or input: one line, exit 2
# ---------------------------------------------------------------------------------------------

def number(kind, low, high=1e30, above=False):
    """An argparse type: a `kind` (int or float) from low (or above it) to high."""
    def parse(text):
        value = kind(text)  # a ValueError: argparse says "invalid int value: ..."
        if not low <= value <= high or above and value == low:  # NaN too
            bound = f"above {low}" if above else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound} and at most {high}, got {text:.60}")
        return value
    parse.__name__ = kind.__name__
    return parse

def build_parser():
    parser = argparse.ArgumentParser(description="Train and evaluate GoogLeNet (Inception v1).")
    parser.set_defaults(**dataclasses.asdict(TrainConfig()))  # the recipe's flags' defaults
    cpus = os.cpu_count() or 1
    switch = argparse.BooleanOptionalAction
    add = parser.add_argument
    add("--dataset", default="tiny", choices=DATASETS, help="folder: DIR/{train,val}/<class>/")
    add("--data-dir", default="data", help="where the dataset is (or goes: --download)")
    add("--download", action="store_true", help="fetch the dataset if it is missing")
    add("--image-size", type=number(int, 8, MAX_IMAGE_SIZE), help="input (224, cifar 32, else 64)")
    add("--subset", type=number(int, 0), default=0, help="about N train and N val images (0: all)")
    add("--loader", default="fast", choices=("fast", "torch"), help="torch: decode per batch")
    add("--crop", choices=("pad", "resized"), help="augmentation (folder: resized, else pad)")
    add("--workers", type=number(int, 0, cpus), default=min(4, cpus), help="decoding processes")
    add("--arch", default="tiny", choices=ARCHS, help="original: the paper's; tiny: 64x64, BN")
    add("--batch-norm", action=switch, help="BatchNorm after each conv (default: tiny's)")
    add("--no-aux", dest="aux", action="store_false", help="drop the two auxiliary heads")
    add("--aux-weight", type=number(float, 0), help="loss weight of each aux head (0.3)")
    add("--epochs", type=number(int, 1, 10**6), help="total epochs (30; a resumed run stops here)")
    add("--batch-size", type=number(int, 1, 2**16), help="per process (128)")
    add("--lr", type=number(float, 0, above=True), help="peak SGD lr per 256 images (0.2)")
    add("--schedule", choices=SCHEDULES, help="cosine (default) or paper: x0.96 every 8 epochs")
    add("--warmup-epochs", type=number(float, 0), help="linear warmup to the peak lr (2)")
    add("--momentum", type=number(float, 0, 0.999999), help="SGD momentum (0.9)")
    add("--nesterov", action=switch, help="Nesterov momentum (on)")
    add("--weight-decay", type=number(float, 0), help="on conv and FC weights (5e-4)")
    add("--label-smoothing", type=number(float, 0, 0.999999), help="label smoothing (0.1)")
    add("--tta", action=switch, help="validate on each image and its mirror")
    add("--seed", type=number(int, 0, 2**32 - 1), help="data order, augmentation, init, dropout")
    add("--precision", choices=PRECISIONS, help="auto: bf16 where native, fp16 on older GPUs")
    add("--compile", action=switch, help="torch.compile the step (minutes)")
    add("--log-interval", type=number(int, 0, 2**31), help="steps between progress lines (50)")
    add("--device", default="auto", choices=("auto", "cuda", "xla", "cpu"), help="auto: any")
    add("--num-cores", type=number(int, 1), help="TPU: 1 core, or leave out for all")
    add("--sync-bn", action=switch, default=False, help="torchrun, CUDA: BatchNorm over all")
    add("--checkpoint-dir", help="for the checkpoints (default: runs/<dataset>)")
    add("--resume", nargs="?", const="last", help="continue a checkpoint (<checkpoint-dir>/last)")
    add("--evaluate", action="store_true", help="only evaluate the --resume checkpoint")
    return parser

MACHINE_FLAGS = ("workers", "device", "num_cores", "sync_bn", "checkpoint_dir", "download",
                 "resume", "evaluate")  # this machine's, this call's: never from a checkpoint

def _command_line(parser, flags):  # the argv of flags ({dest: value}) but MACHINE_FLAGS, defaults
    argv = []
    for action in parser._actions:
        value = flags.get(action.dest, action.default)
        if action.dest not in MACHINE_FLAGS and value != action.default:  # (no positionals)
            argv.append(f"{action.option_strings[0]}={value}")  # a value may start with -
            if action.nargs == 0:  # a switch: --x (store_true), --no-x (store_false, or False)
                argv[-1] = action.option_strings[-1 if value is False else 0]
    return argv

def parse_args(argv=None, parser=None):
    """(args, checkpoint); --resume's saved command line (less MACHINE_FLAGS) gives the defaults."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    checkpoint = None
    if args.evaluate and not args.resume:
        raise UserError("--evaluate needs --resume PATH of the checkpoint to evaluate")
    if args.resume == "last":
        args.resume = str(Path(args.checkpoint_dir or f"runs/{args.dataset}") / LAST_FILE)
    if args.resume:
        path = args.resume
        checkpoint = load_checkpoint(path)
        saved = build_parser()
        saved.prog = f"{saved.prog}: the flags saved in {path}"
        flags = vars(saved.parse_args(checkpoint["argv"]))
        parser.set_defaults(**{k: v for k, v in flags.items() if k not in MACHINE_FLAGS},
                            checkpoint_dir=str(Path(path).parent))
        args = parser.parse_args(argv)
        args.resume = path
    args.checkpoint_dir = args.checkpoint_dir or f"runs/{args.dataset}"
    args.crop = args.crop or {"folder": "resized"}.get(args.dataset, "pad")  # photos: scale jitter
    size = {"original": 224}.get(args.arch, {"cifar10": 32}.get(args.dataset, 64))
    args.image_size = args.image_size or size
    return args, checkpoint

def check_checkpoint_dir(out_dir, resumed=None):
    """out_dir can be written, holds no other run's files, no last newer than the one resumed."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise UserError(f"cannot write checkpoints to {out_dir} ({e.strerror or e})") from None
    found = [name for name in CHECKPOINT_FILES if (out_dir / name).exists()]
    if found and resumed is None:
        raise UserError(f"{out_dir} holds another run's {' and '.join(found)}: --resume it or "
                        f"pass another --checkpoint-dir")
    if resumed is None or LAST_FILE not in found:
        return
    last = load_checkpoint(out_dir / LAST_FILE)["config"]["epoch"]
    if last > resumed["config"]["epoch"]:
        raise UserError(f"{out_dir / LAST_FILE} is newer (epoch {last}): resume it, or branch off "
                        f"into another --checkpoint-dir")

def _model_for_run(args, checkpoint, info):  # a checkpoint's weights decide the shape, not flags
    if checkpoint is None:
        options = {"aux_logits": args.aux, "batch_norm": args.batch_norm}
        model = build_model(args.arch, len(info.class_names), **options)
        return model, model_config_for(info, args.arch, args.image_size, **options)
    saved = checkpoint["config"]
    ids = saved["class_ids"] or info.class_ids  # a config without ids: by their number alone
    if (saved["arch"], saved["num_classes"], ids) != (args.arch, len(ids), info.class_ids):
        raise CheckpointError(f"{args.resume} is a {saved['arch']} net of other classes than "
                              f"this run's {args.arch} on {args.data_dir}")
    model, _ = model_from_checkpoint(checkpoint)
    return model, model_config_for(info, args.arch, args.image_size, **saved["model_options"])

def _run(args, checkpoint=None):  # train or evaluate, in this process (of torchrun's, torch_xla's)
    if checkpoint is None and args.resume:
        checkpoint = load_checkpoint(args.resume)  # each TPU process reads it
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    device = make_device(args.device)
    log = functools.partial(print, flush=True) if device.rank == 0 else (lambda line: None)
    if not args.evaluate and checkpoint and checkpoint["config"]["epoch"] >= config.epochs:
        done = checkpoint["config"]["epoch"]  # said before any data is read
        log(f"{args.resume} has already trained {done} epochs: pass --epochs N (> {done})")
        if device.rank == 0 and checkpoint["history"]:  # a kill after last, before metrics.jsonl
            write_metrics(Path(args.checkpoint_dir) / "metrics.jsonl", checkpoint["history"])
        return checkpoint["history"]
    torch.manual_seed(config.seed)
    info = first_on_each_node(device, lambda first: load_dataset(
        args.dataset, args.data_dir, args.image_size, args.download and first))
    model, model_config = _model_for_run(args, checkpoint, info)
    if args.sync_bn and device.distributed == "ddp":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    precision = resolve_precision(config.precision, device)
    scaler = " (autocast + GradScaler)" * (precision == "fp16")
    processes = f"{device.world_size} processes" * (device.world_size > 1)
    where = ", ".join(filter(None, [str(device.torch_device), device.note, processes]))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"device: {device.kind} ({where}); precision {precision}{scaler}; model {args.arch}: "
        f"{millions:.2f}M parameters, {len(info.class_names)} classes, {args.image_size}px input")
    pin_device = store_device = None
    if device.kind == "cuda":  # the fast store onto the GPU if under 1/4 of its free memory
        pin_device = device.torch_device
        images = sum(min(len(split), args.subset or len(split)) for split in (info.train, info.val))
        if images * 3 * info.source_size**2 < torch.cuda.mem_get_info(pin_device)[0] / 4:
            store_device = pin_device
    train_loader, val_loader = make_loaders(
        info, config.batch_size, args.loader, config.crop, args.workers, args.subset, config.seed,
        device.rank, device.world_size, log, not args.evaluate, store_device, pin_device)
    if args.evaluate:
        result = evaluate(model.to(device.torch_device), val_loader, device, model_config,
                          config.precision, config.tta)
        raise_if_stopped("during evaluation: nothing was saved")
        log(f"evaluate {args.resume}: val loss {result['loss']:.4f} top1 {result['top1']:.4f} top5 "
            f"{result['top5']:.4f} over {result['images']} images" + " (flip TTA)" * config.tta)
        return result
    resumed = checkpoint and f"resumed from {args.resume} {resume_point(checkpoint)}; "
    log(f"{resumed or ''}writing checkpoints to {args.checkpoint_dir}")
    argv = _command_line(build_parser(), vars(args))  # saved in each checkpoint
    return train(model, train_loader, val_loader, model_config, config, device,
                 args.checkpoint_dir, checkpoint, argv, log)

def _xla_worker(index, args, stop_handlers=None):  # a process per TPU core, by torch_xla.launch
    _run(args)

def _launch_on_tpu_cores(args):  # a process per TPU core (all of them), a SIGTERM forwarded
    signal.signal(signal.SIGTERM, _forward_to_children)
    raise_if_stopped()  # the TPU processes start afresh: a stop that came before is not theirs
    import torch_xla
    torch_xla.launch(_xla_worker, args=(args, _MainThreadStopHandlers()))

def _ending(error):  # main's exit code and last line for what ended the run early
    if isinstance(error, Stopped):  # saved where it stopped: not an error
        return error.exit_code, str(error)
    if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C, past the stop handlers
        return 130, "interrupted: a run continues from its last saved epoch with --resume"
    return 1 if isinstance(error, TrainingDiverged) else 2, f"error: {printable(error)}"

def main(argv=None):
    """The command line: 0; 2 on a bad flag or input; 1 on divergence; 128 + signal: stopped."""
    install_stop_handlers()
    try:
        args, checkpoint = parse_args(argv)
        args.device = resolve_device_kind(args.device)
        pjrt = os.environ.get("PJRT_DEVICE", "").upper()
        if args.sync_bn and args.device != "cuda":
            raise UserError("--sync-bn needs CUDA GPUs under torchrun (SyncBatchNorm runs on GPUs)")
        if args.device == "xla" and pjrt == "TPU":
            from torch_xla._internal import tpu  # the chips on the PCI bus: no runtime started
            if tpu.num_local_processes() == 0:  # else torch_xla fails deep inside
                raise UserError("PJRT_DEVICE=TPU, but this machine has no TPU (on the CPU: =CPU)")
        if args.device == "xla" and args.num_cores not in (None, 1):
            raise UserError("--num-cores: 1, or leave it out for all TPU cores (CPU-XLA: torchrun)")
        if not args.evaluate:
            check_checkpoint_dir(args.checkpoint_dir, checkpoint)
        if args.device != "xla" or args.num_cores == 1 or pjrt == "CPU":  # XLA's CPU: one process
            _run(args, checkpoint)
            return 0
        if args.download:  # once, here: processes downloading together would trample each other
            load_dataset(args.dataset, args.data_dir, args.image_size, download=True)
            args.download = False
        _launch_on_tpu_cores(args)
        return 0
    except SystemExit as e:  # argparse's, having printed its usage and error (or --help)
        return e.code
    except (UserError, KeyboardInterrupt) as e:  # Stopped is one
        code, line = _ending(e)
        # One line: from rank 0 if every process raised it (divergence), else from each node's first
        speaker = "RANK" if getattr(e, "everywhere", False) else "LOCAL_RANK"
        if os.environ.get(speaker, "0") == "0":
            print(line, file=sys.stderr, flush=True)
        if getattr(e, "everywhere", False) and torch.distributed.is_initialized():  # diverged:
            torch.distributed.barrier()  # leave once rank 0 said why (torchrun stops the rest)
        return code
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
