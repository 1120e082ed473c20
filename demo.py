"""Gradio demo: upload a photo and see what a trained GoogLeNet thinks it is.

    python demo.py --checkpoint runs/tiny/best.pt          # web app on 127.0.0.1:7860
    python demo.py                                         # newest runs/**/best.pt
    python demo.py --checkpoint runs/tiny/best.pt a.jpg b.png   # no browser: print top-5

Everything about the model (architecture, classes, input size, normalisation) is
read from the checkpoint through ``googlenet.load_for_inference``, and images go
through ``googlenet.decode_image`` + ``googlenet.eval_transform``, the same steps
validation uses, so the demo sees a photo exactly as the validation loop would.

Other code can use ``build_demo(model, config)`` and ``predict(image, model, config)``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

import googlenet

TOP_K = 5
# Requests waiting in the queue are handed to the model together, up to this many.
MAX_BATCH_SIZE = 8
# Beyond this many waiting requests new visitors are told the queue is full,
# which keeps memory bounded when the demo is swamped.
MAX_QUEUE_SIZE = 64
NUM_EXAMPLES = 4
RUNS_DIR = Path("runs")
TRAIN_HINT = ("train one with `python googlenet.py --dataset tiny --data-dir data --download` "
              "(it writes runs/tiny/best.pt) or pass --checkpoint PATH")
NO_IMAGE_MESSAGE = "Upload an image (or pick an example) to see what the model thinks it is."


def default_device() -> str:
    """The device the demo runs the model on: CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def find_latest_checkpoint(runs_dir: Path = RUNS_DIR) -> Path | None:
    """Return the most recently written ``best.pt`` anywhere under ``runs_dir``, or None."""
    if not runs_dir.is_dir():
        return None
    candidates = [p for p in runs_dir.rglob("best.pt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def load_image(image: Any, config: Any) -> torch.Tensor:
    """Decode one image (a path or a PIL image) to uint8 [3, S, S] the way validation does.

    S is the checkpoint's ``source_size``: validation decodes its files with the same
    ``googlenet.decode_image`` call before ``eval_transform`` runs on the device.
    Raises ``googlenet.ImageDecodeError`` when the input is not a readable image.
    """
    return googlenet.decode_image(image, config.source_size)


def decode_batch(images: Sequence[Any], config: Any) -> torch.Tensor:
    """Decode images (paths or PIL images) into one uint8 batch [N, 3, S, S]."""
    return torch.stack([load_image(image, config) for image in images])


def top_k(probs: torch.Tensor, class_names: Sequence[str], k: int = TOP_K) -> dict[str, float]:
    """Map one row of class probabilities to ``{class name: probability}`` for the k best.

    Two classes can share a short human name (WordNet has several "crane"s), and a
    dict would silently merge them, so a repeated name gets its class index appended.
    """
    values, indices = probs.float().cpu().topk(min(k, probs.numel()))
    result: dict[str, float] = {}
    for value, index in zip(values.tolist(), indices.tolist()):
        name = class_names[index]
        if name in result:
            name = f"{name} (class {index})"
        result[name] = value
    return result


def predict_many(images: Sequence[Any], model: torch.nn.Module, config: Any,
                 k: int = TOP_K) -> list[dict[str, float]]:
    """Top-k ``{class name: probability}`` for each image (paths or PIL images), in one batch."""
    if not images:
        return []
    probs = googlenet.predict_proba(model, config, decode_batch(images, config))
    return [top_k(row, config.class_names, k) for row in probs]


def predict(image: Any, model: torch.nn.Module, config: Any, k: int = TOP_K) -> dict[str, float]:
    """Top-k ``{class name: probability}`` for one image (a path or a PIL image).

    ``model, config`` are what ``googlenet.load_for_inference`` returns. Raises
    ``googlenet.ImageDecodeError`` for input that is not a readable image.
    """
    return predict_many([image], model, config, k)[0]


# --------------------------------------------------------------------------- examples


def _shared_photos_dir() -> Path:
    """Where the project's sample photos live (the tests' GOOGLENET_SHARED_DATA applies)."""
    root = os.environ.get("GOOGLENET_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parent.parent / "shared" / "data"
    return base / "photos"


def _first_of_each_class(labels: Sequence[int], limit: int) -> list[int]:
    """Indices of the first image of each class, in order, so examples show different things."""
    seen: set[int] = set()
    picked: list[int] = []
    for index, label in enumerate(labels):
        if label not in seen:
            seen.add(label)
            picked.append(index)
            if len(picked) == limit:
                break
    return picked


def _cifar_examples(data_dir: Path, limit: int) -> list[Path]:
    """CIFAR-10 keeps its test set in a pickled batch, so write a few of its images as PNGs.

    Only test_batch is read (googlenet.load_dataset would also load 50,000 training
    images), and the files go to one fixed folder, so restarts overwrite instead of
    piling up.
    """
    from PIL import Image

    batch_file = data_dir / "cifar-10-batches-py" / "test_batch"
    if not batch_file.is_file():
        return []
    with batch_file.open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    out_dir = Path(tempfile.gettempdir()) / "googlenet-demo-examples"
    out_dir.mkdir(exist_ok=True)
    paths = []
    for index in _first_of_each_class(batch[b"labels"], limit):
        path = out_dir / f"cifar10-test-{index}.png"
        Image.fromarray(batch[b"data"][index].reshape(3, 32, 32).transpose(1, 2, 0)).save(path)
        paths.append(path)
    return paths


def example_images(config: Any, limit: int = NUM_EXAMPLES) -> list[Path]:
    """A few validation images of the checkpoint's dataset (one per class), if still on disk.

    Falls back to the project's sample photos, and to none when neither is there.
    """
    paths: list[Path] = []
    data_dir = Path(config.data_dir) if config.data_dir else None
    if data_dir is not None and data_dir.is_dir():
        if config.dataset == "cifar10":
            paths = _cifar_examples(data_dir, limit)
        elif config.dataset in ("tiny", "folder"):
            # googlenet.py knows these layouts (Tiny ImageNet's val labels live in
            # val_annotations.txt); listing files decodes nothing, so this is quick.
            try:
                val = googlenet.load_dataset(config.dataset, str(data_dir), config.source_size).val
            except googlenet.UserError:
                val = None
            if val is not None and val.files:
                paths = [Path(val.files[i]) for i in _first_of_each_class(val.labels, limit)]
    if not paths:
        photos = _shared_photos_dir()
        if photos.is_dir():
            paths = sorted(p for p in photos.iterdir() if p.is_file())[:limit]
    return paths


# --------------------------------------------------------------------------- web app


def describe_checkpoint(config: Any, checkpoint: str | Path | None = None,
                        device: str | None = None) -> str:
    """One Markdown line about the model: dataset, arch, epochs and validation top-1."""
    top1 = config.val_top1 if config.val_top1 is not None else config.best_top1
    parts = []
    if checkpoint is not None:
        parts.append(f"checkpoint `{checkpoint}`")
    parts += [
        f"dataset **{config.dataset}** ({config.num_classes} classes)",
        f"arch **{config.arch}**",
        f"epoch **{config.epoch}**",
        "validation top-1 " + (f"**{top1:.1%}**" if top1 is not None else "**not measured**"),
    ]
    if device is not None:
        parts.append(f"running on {device}")
    return " · ".join(parts)


def _display_name(payload: dict) -> str:
    """The uploaded file's own name, safe to put inside Markdown backticks."""
    name = payload.get("orig_name") or Path(payload.get("path") or "upload").name
    return name.replace("`", "'")


def classify_uploads(payloads: list[dict | None], model: torch.nn.Module,
                     config: Any) -> tuple[list[dict[str, float] | None], list[str]]:
    """The web app's batched handler: Gradio file payloads in, (labels, messages) out.

    Each upload is decoded on its own so that one bad file only produces a message
    for that person instead of failing everyone else's request in the same batch.
    """
    labels: list[dict[str, float] | None] = [None] * len(payloads)
    messages = [""] * len(payloads)
    decoded: list[torch.Tensor] = []
    decoded_slots: list[int] = []
    for slot, payload in enumerate(payloads):
        # The image component is wired with preprocess=False, so a payload is
        # Gradio's file description (or None when the image was cleared): we
        # decode the file ourselves instead of letting Gradio re-encode it.
        if not payload or not payload.get("path"):
            messages[slot] = NO_IMAGE_MESSAGE
            continue
        try:
            decoded.append(load_image(payload["path"], config))
            decoded_slots.append(slot)
        except Exception as err:  # any decoder failure is this upload's problem only
            print(f"demo: could not read upload {payload.get('orig_name')!r}: {err}",
                  file=sys.stderr)
            messages[slot] = (f"**Could not read `{_display_name(payload)}` as an image.** "
                              "Please upload a photo (JPEG, PNG, WebP, GIF, BMP, TIFF, ...).")
    if decoded:
        probs = googlenet.predict_proba(model, config, torch.stack(decoded))
        for slot, row in zip(decoded_slots, probs):
            labels[slot] = top_k(row, config.class_names)
    return labels, messages


def build_demo(model: torch.nn.Module, config: Any, checkpoint: str | Path | None = None,
               examples: Sequence[str | Path] | None = None):
    """Build (but do not launch) the Gradio app for a loaded model.

    ``examples`` defaults to ``example_images(config)``. The returned ``gr.Blocks``
    has its queue configured: requests are served one batch at a time, batched up
    to ``MAX_BATCH_SIZE``. The prediction endpoint is ``/predict``: it takes an
    image file and returns (top-5 label, message).
    """
    import gradio as gr

    if examples is None:
        examples = example_images(config)
    device = str(next(model.parameters()).device)

    # Every batch runs on this one thread. Gradio calls handlers from a pool of up to
    # 40 threads, and PyTorch's CPU thread pool (OpenMP) is per calling thread, so each
    # of those would grow its own set of threads and buffers. Measured over 810 requests
    # after a warm-up: 761 -> 885-912 MiB that way, 733 -> 741 MiB on one thread.
    inference_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="googlenet-demo")

    def classify(image):
        # Batched: `image` is a list of uploads, one per queued request.
        return inference_thread.submit(classify_uploads, image, model, config).result()

    # delete_cache: uploads leave Gradio's temp folder after an hour instead of piling up.
    with gr.Blocks(title="GoogLeNet demo", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown("## What does this GoogLeNet see?\n" + describe_checkpoint(config, checkpoint, device))
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath",
                                 sources=["upload", "clipboard", "webcam"], elem_id="image")
                message = gr.Markdown(label="Message", elem_id="message")
            label = gr.Label(label=f"Top-{TOP_K}", num_top_classes=TOP_K, elem_id="prediction")
        if examples:
            gr.Examples(examples=[[str(p)] for p in examples], inputs=image)
        # change (not upload) so that picking an example or clearing the image
        # also updates the prediction.
        image.change(classify, inputs=image, outputs=[label, message], api_name="predict",
                     preprocess=False, batch=True, max_batch_size=MAX_BATCH_SIZE,
                     concurrency_limit=1, trigger_mode="always_last")
    return demo.queue(max_size=MAX_QUEUE_SIZE)


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message, for main() to print
        raise googlenet.UserError(f"{message} (see python demo.py --help)")


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"must be 1-65535, got {text}")
    return port


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(
        description="Classify photos with a trained GoogLeNet: a web app, or top-5 "
                    "printed for the image files given.")
    parser.add_argument("images", nargs="*", type=Path,
                        help="image files to classify on the command line (no web app)")
    parser.add_argument("--checkpoint", type=Path,
                        help="checkpoint to serve (default: the newest runs/**/best.pt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    return parser.parse_args(argv)


def _print_predictions(images: Sequence[Path], model: torch.nn.Module, config: Any) -> int:
    """CLI mode: print the top-5 for each image; unreadable images get one line on stderr."""
    status = 0
    for path in images:
        try:
            result = predict(path, model, config)
        except googlenet.UserError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
            continue
        print(path)
        for rank, (name, prob) in enumerate(result.items(), start=1):
            print(f"  {rank}. {prob:6.1%}  {name}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (see the module docstring); returns the process exit code."""
    try:
        args = _parse_args(argv)
    except googlenet.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = find_latest_checkpoint()
        if checkpoint is None:
            print(f"error: no --checkpoint given and no best.pt under {RUNS_DIR}/: {TRAIN_HINT}",
                  file=sys.stderr)
            return 2
        print(f"Using the newest checkpoint under {RUNS_DIR}/: {checkpoint}", file=sys.stderr)

    device = default_device()
    try:
        model, config = googlenet.load_for_inference(checkpoint, device=device)
    except googlenet.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.images:
        return _print_predictions(args.images, model, config)

    demo = build_demo(model, config, checkpoint=checkpoint)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    except OSError:  # Gradio's message talks about its own parameters, not our flags
        print(f"error: cannot serve on {args.host}:{args.port}: the port is taken or the address "
              "is not this machine's; choose another with --port or --host", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
