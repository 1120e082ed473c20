"""Benchmarks for googlenet.py (not training): the default training path against a naive loop,
and the data paths.

    python bench.py --dataset tiny --data-dir ../shared/data --batch-size 64 --workers 2 \
        --device cpu
    python bench.py --data --dataset tiny --data-dir ../shared/data   # images/s of the two loaders
    python bench.py --profile --dataset synthetic --image-size 64 --batch-size 128 --device cpu

Every googlenet.py flag works here too (dataset, arch, batch size, device, precision, ...).
"""

import dataclasses
import sys
import time

import torch

import googlenet as g


def quiet(*args):
    pass


class NaiveDataset(torch.utils.data.Dataset):
    """The notebook way: open each image with PIL per sample, resize, pad-crop, flip, ToTensor."""

    def __init__(self, split, size, mean, std):
        from torchvision import transforms as T
        self.split = split
        self.transform = T.Compose([T.Resize((size, size)),
                                    T.RandomCrop(size, padding=max(1, size // 8)),
                                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        from PIL import Image
        source = self.split.source(i)  # an image (CIFAR-10) or a path (Tiny ImageNet, folders)
        if isinstance(source, Image.Image):
            return self.transform(source.convert("RGB")), self.split.labels[i]
        with Image.open(source) as image:
            return self.transform(image.convert("RGB")), self.split.labels[i]


def _peak_memory_mib(device):
    if device.kind == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device):
    if device.kind == "cuda":
        torch.cuda.synchronize()
    elif device.kind == "xla":
        import torch_xla
        torch_xla.sync()


def naive_rate(args, config, device, info):
    """img/s of the naive loop: a per-sample PIL DataLoader, fp32 NCHW, .item() every step."""
    torch.manual_seed(config.seed)
    model = g.build_model(args.arch, len(info.class_names), aux_logits=args.aux)
    model = model.to(device.torch_device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dataset = NaiveDataset(info.train, args.image_size, info.mean, info.std)
    context = "spawn" if args.workers else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.workers,
                                         multiprocessing_context=context)
    start = None
    count = 0
    for step, (x, y) in enumerate(loader):
        if step == 2:
            start = time.perf_counter()  # after warm-up: workers started, first steps done
        outputs = model(x.to(device.torch_device))
        loss = g.googlenet_loss(outputs, y.to(device.torch_device), config.aux_weight).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        if start is not None:
            count += config.batch_size
    return count / (time.perf_counter() - start)


def default_rate(args, config, device, info):
    """img/s of the default path: uint8 store, on-device augmentation, auto precision,
    channels_last, foreach SGD, no per-step sync."""
    model_config = g.model_config_for(info, args.arch, args.image_size)
    torch.manual_seed(config.seed)
    model = g.build_model(args.arch, len(info.class_names), aux_logits=args.aux)
    model = model.to(device.torch_device)
    if g.uses_channels_last(device):
        model.to(memory_format=torch.channels_last)
    optimizer = g.make_optimizer(model, config, device.kind)
    step_model = torch.compile(model) if config.compile else None  # --compile: compiled in warm-up
    store = g.build_store(info.train, info.source_size, args.workers, log=quiet)
    batch = config.batch_size
    for part in (slice(None, 2 * batch), slice(2 * batch, None)):  # warm-up, then timed
        images = g.ImageStore(store.images[part], store.labels[part])
        loader = g.StoreLoader(images, batch, True, config.seed)
        result = g.train_one_epoch(model, loader, optimizer, device, model_config, config, 0, quiet,
                                   step_model)
    return result["train_images"] / result["epoch_seconds"]


def profile(args, config, device, info):
    """Where the default path's time goes: torch.profiler's table by op, over its timed steps."""
    info.train = info.train.subset((args.steps + 2) * config.batch_size)
    with torch.profiler.profile() as profiler:
        rate = default_rate(args, config, device, info)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"default: {rate:.1f} img/s (under the profiler, warm-up included in the table)")


def steps(args, config, device, info):
    """img/s of `args.steps` training steps of the default path and of a naive loop on the same
    images, model, batch and workers; both, their ratio, peak memory."""
    batch = config.batch_size
    info.train = info.train.subset((args.steps + 2) * batch)
    precision = g.resolve_precision(config.precision, device)
    print(f"benchmark: {args.arch} at {args.image_size}x{args.image_size}, batch {batch}, "
          f"{args.steps} steps, {args.workers} workers, device {device.kind}, "
          f"precision {precision}")
    rates = {}
    for name, measure in (("naive", naive_rate), ("default", default_rate)):
        rates[name] = measure(args, config, device, info)
        print(f"{name:>8}: {rates[name]:7.1f} img/s, "
              f"peak memory so far {_peak_memory_mib(device):.0f} MiB", flush=True)
    print(f"default / naive = {rates['default'] / rates['naive']:.2f}x")
    return rates


def data(args, config, device, info, batches=60):
    """images/s of the two data paths (--loader fast and torch), augmented on the device, same
    data and batch."""
    results = {}
    for loader_kind in ("torch", "fast"):
        start = time.perf_counter()
        train_loader, _ = g.make_loaders(info, config.batch_size, loader_kind,
                                         config.crop, args.workers, args.subset, config.seed,
                                         log=quiet)
        setup = time.perf_counter() - start
        count = 0
        iterator = g.device_batches(train_loader, device)
        next(iterator)  # warm-up: workers start, first batch
        start = time.perf_counter()
        for _ in range(min(batches, len(train_loader)) - 1):
            images, labels, params = next(iterator)
            images = g.train_transform(images, params, args.image_size, info.mean, info.std,
                                       config.crop)
            count += images.shape[0]
        _sync(device)
        results[loader_kind] = count / (time.perf_counter() - start)
        print(f"{loader_kind:>5}: {results[loader_kind]:8.0f} images/s over {count} images "
              f"(setup {setup:.1f}s), batch {config.batch_size}, workers {args.workers}",
              flush=True)
    print(f"fast / torch = {results['fast'] / results['torch']:.1f}x on {args.dataset} at "
          f"{args.image_size}x{args.image_size}, device {device.kind}")
    return results


def main(argv=None):
    parser = g.build_parser()
    parser.description = ("Benchmarks of googlenet.py: the default training path against a naive "
                          "loop, or --data.")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--steps", type=g.number(int, 1), default=20,
                       help="steps each path is timed for (20)")
    group.add_argument("--data", action="store_true",
                       help="images/s of the fast and torch data paths instead")
    group.add_argument("--profile", action="store_true",
                       help="a torch.profiler table of the default path instead")
    try:
        args, _ = g.parse_args(argv, parser)
        device = g.make_device(g.resolve_device_kind(args.device))
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(g.TrainConfig)}
        config = g.TrainConfig(**fields)
        config.log_interval = 0
        info = g.load_dataset(args.dataset, args.data_dir, args.image_size, args.download)
        benchmark = steps
        if args.data or args.profile:
            benchmark = data if args.data else profile
        benchmark(args, config, device, info)
    except g.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
