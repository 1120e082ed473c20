"""Gradio demo: upload a photo and see what a trained GoogLeNet thinks it is.

    python demo.py --checkpoint runs/tiny/best.pt          # web app on 127.0.0.1:7860
    python demo.py                                         # newest runs/**/best.pt
    python demo.py --checkpoint runs/tiny/best.pt a.jpg b.png   # no browser: print top-5

Everything about the model (architecture, classes, input size, normalisation) is read
from the checkpoint through ``googlenet.load_checkpoint``, which loads weights and plain
metadata only (``weights_only``) and checks that they agree. Nothing the checkpoint
names is opened: example images travel inside the checkpoint as small uint8 arrays (or
come from ``--examples DIR``). Images go through ``googlenet.decode_image`` +
``googlenet.eval_transform``, the steps validation uses. Every string from the checkpoint,
metrics.jsonl or an upload's name reaches the page as text (``plain``), never as markup.

The "Training" tab plots the run's curves from ``metrics.jsonl`` beside the checkpoint
(or the history stored in the checkpoint), refreshed while the run is still training.

Other code can use ``build_demo(model, config)`` and ``predict(image, model, config)``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import re
import shutil
import signal
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

import googlenet

TOP_K = 5
# Requests waiting in the queue are handed to the model together, up to this many.
MAX_BATCH_SIZE = 16
# Waiting requests hold only a file path, so a deep queue costs little memory: a burst of
# hundreds from one page or script is answered instead of refused.
MAX_QUEUE_SIZE = 1024
# Untrusted uploads: at most this many bytes, and this many pixels after JPEG's reduced-scale
# decoding (a 13000x13000 PNG would otherwise take ~2 GiB and seconds of everyone's queue).
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000
NUM_EXAMPLES = 4
REFRESH_SECONDS = 10
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

    S is the checkpoint's ``source_size``. Images beyond ``MAX_UPLOAD_PIXELS`` are refused.
    Raises ``googlenet.ImageDecodeError`` when the input is not a readable image.
    """
    return googlenet.decode_image(image, config.source_size, max_pixels=MAX_UPLOAD_PIXELS)


def decode_batch(images: Sequence[Any], config: Any) -> torch.Tensor:
    """Decode images (paths or PIL images) into one uint8 batch [N, 3, S, S]."""
    return torch.stack([load_image(image, config) for image in images])


def plain(text: Any) -> str:
    """`text` from a checkpoint, metrics.jsonl or an upload's name, made literal in gr.Markdown.
    Gradio renders Markdown with raw HTML, GFM autolinks and $$ LaTeX (its sanitizer keeps <img>,
    <a> and <form>), so html.escape is not enough: every ASCII punctuation mark is
    backslash-escaped and whitespace runs become one space, so that nothing in it can open a tag,
    link, image, formula or block."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", " ".join(str(text).split()))


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


def example_images(checkpoint: dict | None = None, examples_dir: str | Path | None = None,
                   limit: int = NUM_EXAMPLES) -> list[Path]:
    """Example images for the page: the image files in ``examples_dir`` when given, else the
    small validation images stored in the checkpoint (from ``googlenet.load_checkpoint``, which
    checked them), written as PNGs into a new private temporary folder that is removed at exit,
    else none. No path stored in the checkpoint is ever followed."""
    if examples_dir is not None:
        folder = Path(examples_dir)
        return sorted(p for p in folder.iterdir()
                      if p.is_file() and p.suffix.lower() in googlenet.IMAGE_EXTENSIONS)[:limit]
    stored = (checkpoint or {}).get("examples")
    if not stored:
        return []
    from PIL import Image

    # mkdtemp: a new folder only we can write, so no file of someone else's (or symlink) is
    # followed, whatever else lives in the shared temp folder.
    out_dir = Path(tempfile.mkdtemp(prefix="googlenet-demo-examples-"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    paths = []
    for index, image in enumerate(stored["images"][:limit]):
        path = out_dir / f"example-{index}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- training curves


def read_history(checkpoint_path: str | Path | None, checkpoint: dict | None = None) -> list[dict]:
    """The run's per-epoch metrics: ``metrics.jsonl`` beside the checkpoint (it grows while the
    run trains), else the history stored in the checkpoint. Lines that are not per-epoch records
    (``googlenet.is_epoch_record``: wrong types, nulls, NaN, not JSON) are skipped."""
    records: list[Any] = []
    metrics = Path(checkpoint_path).parent / "metrics.jsonl" if checkpoint_path is not None else None
    if metrics is not None and metrics.is_file():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except (ValueError, RecursionError):
                continue
    records = [r for r in records if googlenet.is_epoch_record(r)]
    return records or [h for h in (checkpoint or {}).get("history") or [] if googlenet.is_epoch_record(h)]


def curves(history: Sequence[dict]):
    """Long-format tables for the Training tab's plots: (loss, accuracy, learning rate)."""
    import pandas as pd

    def table(columns: dict[str, str]):
        rows = [{"epoch": h["epoch"], "value": float(h[key]), "series": name}
                for h in history for key, name in columns.items()
                if isinstance(h.get(key), (int, float))]
        return pd.DataFrame(rows, columns=["epoch", "value", "series"])

    return (table({"train_loss": "train loss (main head)", "val_loss": "val loss"}),
            table({"val_top1": "val top-1", "val_top5": "val top-5"}),
            table({"lr": "learning rate"}))


def describe_run(history: Sequence[dict], checkpoint: dict | None) -> str:
    """Markdown: the run's settings and its best epoch."""
    if not history:
        return ("No training metrics found: there is no `metrics.jsonl` beside this checkpoint and "
                "the checkpoint stores no history.")
    # The model config wins over the TrainConfig, which wins over the flags (the device is a flag).
    run = {k: v for part in ("args", "train_config", "config") for k, v in ((checkpoint or {}).get(part) or {}).items()}
    shown = {key: plain(run.get(key, "?")) for key in
             ("arch", "dataset", "epochs", "batch_size", "lr", "schedule", "precision", "device")}
    best = max(history, key=lambda h: h["val_top1"])
    settings = [f"arch **{shown['arch']}**", f"dataset **{shown['dataset']}**", f"epochs **{shown['epochs']}**",
                f"batch **{shown['batch_size']}** per device",
                f"lr **{shown['lr']}** per 256 images ({shown['schedule']})",
                f"precision **{shown['precision']}**", f"device **{shown['device']}**"]
    return (" · ".join(settings) + f"\n\n**Best epoch {best['epoch']}**: val top-1 "
            f"{best['val_top1']:.2%}, top-5 {best.get('val_top5', 0):.2%}"
            f"{' with flip TTA' if best.get('val_tta') else ''} ({len(history)} epoch{'s' * (len(history) != 1)} so far)")


# --------------------------------------------------------------------------- web app


def describe_checkpoint(config: Any, device: str | None = None) -> str:
    """One Markdown line about the model: dataset, arch, epochs and validation top-1 (no local
    paths: a --share link would publish them)."""
    top1 = config.val_top1 if config.val_top1 is not None else config.best_top1
    parts = [
        f"dataset **{plain(config.dataset)}** ({config.num_classes} classes)",
        f"arch **{config.arch}**",
        f"epoch **{config.epoch}**",
        "validation top-1 " + (f"**{top1:.1%}**" if top1 is not None else "**not measured**"),
    ]
    if device is not None:
        parts.append(f"running on {device}")
    return " · ".join(parts)


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
            if Path(payload["path"]).stat().st_size > MAX_UPLOAD_BYTES:
                raise googlenet.ImageTooLargeError(f"larger than {MAX_UPLOAD_BYTES // 2**20} MB")
            decoded.append(load_image(payload["path"], config))
            decoded_slots.append(slot)
        except Exception as err:  # any decoder failure is this upload's problem only
            print(f"demo: refused upload {payload.get('orig_name')!r}: {err}", file=sys.stderr)
            name = plain(payload.get("orig_name") or Path(payload["path"]).name)
            messages[slot] = (f"**{name} is too large**: please send an image under {MAX_UPLOAD_BYTES // 2**20} "
                              f"MB and {MAX_UPLOAD_PIXELS // 10**6} megapixels."
                              if isinstance(err, googlenet.ImageTooLargeError) else
                              f"**Could not read {name} as an image.** Please upload a photo (JPEG, PNG, "
                              "WebP, GIF, BMP, TIFF, ...).")
    if decoded:
        probs = googlenet.predict_proba(model, config, torch.stack(decoded))
        for slot, row in zip(decoded_slots, probs):
            labels[slot] = top_k(row, config.class_names)
    return labels, messages


def build_demo(model: torch.nn.Module, config: Any, examples: Sequence[str | Path] | None = None,
               checkpoint_path: str | Path | None = None, checkpoint: dict | None = None):
    """Build (but do not launch) the Gradio app for a loaded model.

    Two tabs: "Classify" (image in, top-5 out; endpoint ``/predict`` takes an image file and
    returns (top-5 label, message)) and "Training" (the run's curves from
    ``read_history(checkpoint_path, checkpoint)``, refreshed every ``REFRESH_SECONDS``).
    The returned ``gr.Blocks`` has its queue configured: requests are served one batch at a
    time, batched up to ``MAX_BATCH_SIZE``.
    """
    import gradio as gr

    device = str(next(model.parameters()).device)

    # Every batch runs on this one thread. Gradio calls handlers from a pool of up to
    # 40 threads, and PyTorch's CPU thread pool (OpenMP) is per calling thread, so each
    # of those would grow its own set of threads and buffers. Measured over 810 requests
    # after a warm-up: 761 -> 885-912 MiB that way, 733 -> 741 MiB on one thread.
    inference_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="googlenet-demo")

    def classify(image):
        # Batched: `image` is a list of uploads, one per queued request.
        return inference_thread.submit(classify_uploads, image, model, config).result()

    def training_view():
        history = read_history(checkpoint_path, checkpoint)
        loss, accuracy, lr = curves(history)
        return describe_run(history, checkpoint), loss, accuracy, lr

    # delete_cache: uploads leave Gradio's temp folder after an hour instead of piling up.
    with gr.Blocks(title="GoogLeNet demo", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown("## What does this GoogLeNet see?\n" + describe_checkpoint(config, device))
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Image", type="filepath",
                                     sources=["upload", "clipboard", "webcam"], elem_id="image")
                    message = gr.Markdown(label="Message", elem_id="message")
                label = gr.Label(label=f"Top-{TOP_K}", num_top_classes=TOP_K, elem_id="prediction")
            if examples:
                gr.Examples(examples=[[str(p)] for p in examples], inputs=image)
        with gr.Tab("Training", elem_id="training-tab"):
            summary = gr.Markdown(elem_id="run-summary")
            with gr.Row():
                loss_plot = gr.LinePlot(x="epoch", y="value", color="series", title="Loss",
                                        elem_id="loss-plot")
                accuracy_plot = gr.LinePlot(x="epoch", y="value", color="series", title="Validation accuracy",
                                            elem_id="accuracy-plot")
                lr_plot = gr.LinePlot(x="epoch", y="value", color="series", title="Learning rate (epoch start)",
                                      elem_id="lr-plot")
        outputs = [summary, loss_plot, accuracy_plot, lr_plot]
        demo.load(training_view, outputs=outputs, api_visibility="private", queue=False)
        gr.Timer(REFRESH_SECONDS).tick(training_view, outputs=outputs, api_visibility="private", queue=False)
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
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
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
    parser.add_argument("--examples", type=Path, default=None,
                        help="folder of example images to offer (default: those stored in the checkpoint)")
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
        if args.examples is not None and not args.examples.is_dir():
            raise googlenet.UserError(f"--examples {args.examples}: not a folder of images")
        checkpoint_path = args.checkpoint
        if checkpoint_path is None:
            checkpoint_path = find_latest_checkpoint()
            if checkpoint_path is None:
                raise googlenet.UserError(f"no --checkpoint given and no best.pt under {RUNS_DIR}/: {TRAIN_HINT}")
            print(f"Using the newest checkpoint under {RUNS_DIR}/: {checkpoint_path}", file=sys.stderr)
        checkpoint = googlenet.load_checkpoint(checkpoint_path)  # checked whole: weights and metadata
        model, config = googlenet.model_from_checkpoint(checkpoint)
        model = model.to(default_device()).eval()
    except googlenet.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.images:
        return _print_predictions(args.images, model, config)

    demo = build_demo(model, config, example_images(checkpoint, args.examples),
                      checkpoint_path=checkpoint_path, checkpoint=checkpoint)
    # SIGTERM (kill, systemd) stops the server like Ctrl-C, so that atexit removes the example folder.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                    max_file_size=MAX_UPLOAD_BYTES)
    except OSError:  # Gradio's message talks about its own parameters, not our flags
        print(f"error: cannot serve on {args.host}:{args.port}: the port is taken or the address "
              "is not this machine's; choose another with --port or --host", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
