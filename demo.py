"""Gradio demo: upload a photo and see what a trained GoogLeNet thinks it is.

    python demo.py                       # web app on 127.0.0.1:7860 for runs/tiny/best.safetensors
    python demo.py --checkpoint runs/cifar10/best.safetensors a.jpg b.png  # no browser: top-5 each

Other code can use ``build_demo(model, config)`` and ``predict(image, model, config)``.
"""

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import googlenet

TOP_K = 5
MAX_BATCH_SIZE = 16  # requests waiting in the queue go through the model together, up to this many
MAX_QUEUE_SIZE = 1024  # a waiting request holds only a file path: a burst of hundreds is answered
# Uploads are untrusted: a huge PNG would take gigabytes and hold everyone's queue up for seconds.
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000
CAM_SIZE = 224  # the map is shown over the photo as the model crops it, at this size (not 32x32)
CAM_OPACITY = 0.6  # red up to this much at the map's peak: the photo shows through
REFRESH_SECONDS = 10
MAX_METRICS_ROWS = 5000  # the newest metrics.jsonl lines (or history entries) plotted
MAX_ROW_BYTES = 64 * 2**10  # a longer metrics.jsonl line is skipped unread
MAX_READ_BYTES = 8 * 2**20  # each refresh reads at most the newest 8 MiB of metrics.jsonl
MAX_TEXT = 1000  # characters of any one string from a checkpoint or an upload's name shown
# The Training tab: its settings line (field: label) and plots (name: (title, {field: series})).
SETTINGS = {"arch": "arch", "dataset": "dataset", "epochs": "epochs", "batch_size": "batch/device",
            "lr": "lr/256 images", "schedule": "schedule", "precision": "precision"}
PLOTS = {"loss": ("Loss", {"train_loss": "train loss (main head)", "val_loss": "val loss"}),
         "accuracy": ("Validation accuracy", {"val_top1": "val top-1", "val_top5": "val top-5"}),
         "lr": ("Learning rate (epoch start)", {"lr": "learning rate"})}
NO_IMAGE_MESSAGE = "Upload an image to see what the model thinks it is."

def load_image(image, config, size: int | None = None) -> torch.Tensor:
    """A path or PIL image decoded as validation does: uint8 [3, S, S], S `size` or source_size."""
    return googlenet.decode_image(image, size or config.source_size, max_pixels=MAX_UPLOAD_PIXELS)

def plain(text) -> str:
    """`text` (from a checkpoint, metrics.jsonl or an upload's name) as literal gr.Markdown text."""
    # Gradio's Markdown renders raw HTML (its sanitizer keeps <img>, <a>, <form>), autolinks and $$
    # LaTeX: escape every ASCII punctuation mark, fold whitespace (no block opens), \x.. the rest.
    text = " ".join(googlenet.printable(str(text)[:MAX_TEXT]).split())
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", text)

def top_k(probs: torch.Tensor, class_names, k: int = TOP_K) -> dict[str, float]:
    """One row of class probabilities as ``{class name: probability}`` for the k best."""
    values, indices = probs.float().cpu().topk(min(k, probs.numel()))
    result = {}
    for value, index in zip(values.tolist(), indices.tolist()):
        # Two classes can share a name (WordNet has several "crane"s): a dict would merge them.
        name = class_names[index]
        result[name if name not in result else f"{name} (class {index})"] = value
    return result

def predict_many(images, model, config, k: int = TOP_K) -> list[dict[str, float]]:
    """Top-k ``{class name: probability}`` for each image (paths or PIL images), in one batch."""
    batch = torch.stack([load_image(image, config) for image in images])
    probs = googlenet.predict_proba(model, config, batch)
    return [top_k(row, config.class_names, k) for row in probs]

def predict(image, model, config, k: int = TOP_K) -> dict[str, float]:
    """Top-k for one image; ``model, config`` as ``googlenet.load_for_inference`` returns them."""
    return predict_many([image], model, config, k)[0]

def private_folder(prefix: str, parent: str | None = None) -> Path:
    """A new folder in parent (else the temp folder) that only we can write, removed at exit."""
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder

def is_number(value) -> bool:
    """An int or float within ±1e30: compared, never converted (float() of 10**400 overflows)."""
    return type(value) in (int, float) and -1e30 <= value <= 1e30  # NaN fails both comparisons

def is_epoch_record(record) -> bool:
    """A record to show (nothing checked it before): a whole epoch, val top-1 (top-5) in [0, 1]."""
    if type(record) is not dict or type(record.get("epoch")) is not int:
        return False
    accuracies = [record.get("val_top1"), record.get("val_top5", 0.0)]
    return 1 <= record["epoch"] <= 10**6 and all(is_number(a) and 0 <= a <= 1 for a in accuracies)

def parse_row(line: bytes):
    with contextlib.suppress(ValueError, RecursionError):  # torn, cut by the read, or hostile
        return json.loads(line) if len(line) <= MAX_ROW_BYTES else None

def read_history(checkpoint_path, checkpoint: dict | None = None) -> list[dict]:
    """The epoch records of metrics.jsonl beside the checkpoint (read afresh: it grows while the
    run trains; nothing is kept, so concurrent calls are safe), else of the checkpoint's history."""
    lines = []
    with contextlib.suppress(OSError):  # no file (yet), or it is being replaced
        if checkpoint_path is not None:
            with open(Path(checkpoint_path).parent / "metrics.jsonl", "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - MAX_READ_BYTES))
                lines = f.read(MAX_READ_BYTES).split(b"\n")[-MAX_METRICS_ROWS - 1:]  # 1 more: ""
    records = [row for row in map(parse_row, lines) if is_epoch_record(row)]
    history = (checkpoint or {}).get("history")
    if not records and isinstance(history, list):
        records = [record for record in history[-MAX_METRICS_ROWS:] if is_epoch_record(record)]
    return records

def curves(history):
    """A long-format table for each of PLOTS: the epoch, a value, its series."""
    import pandas as pd
    tables = []
    for _, columns in PLOTS.values():
        rows = [{"epoch": h["epoch"], "value": float(h[key]), "series": series}
                for h in history for key, series in columns.items() if is_number(h.get(key))]
        tables.append(pd.DataFrame(rows, columns=["epoch", "value", "series"]))
    return tables

def describe_run(history, checkpoint: dict | None) -> str:
    """Markdown: the run's settings (its model config wins over its TrainConfig) and best epoch."""
    if not history:
        return "No training metrics: no `metrics.jsonl` beside this checkpoint, no history in it."
    checkpoint = checkpoint or {}
    run = {**(checkpoint.get("train_config") or {}), **(checkpoint.get("config") or {})}
    settings = " · ".join(f"{label} **{plain(run.get(key, '?'))}**"
                          for key, label in SETTINGS.items())
    best = max(history, key=lambda h: h["val_top1"])
    epochs = "1 epoch" if len(history) == 1 else f"{len(history)} epochs"
    tta = " with flip TTA" if best.get("val_tta") else ""
    return (f"{settings}\n\n**Best epoch {best['epoch']}**: val top-1 {best['val_top1']:.2%}, "
            f"top-5 {best.get('val_top5', 0):.2%}{tta} ({epochs} so far)")

def page_header(model, config) -> str:
    """The page's first line: what the model is (no local paths: --share would publish them)."""
    top1 = config.val_top1 if config.val_top1 is not None else config.best_top1
    accuracy = "**not measured**" if top1 is None else f"**{top1:.1%}**"
    return (f"dataset **{plain(config.dataset)}** ({config.num_classes} classes) · arch "
            f"**{config.arch}** · epoch **{config.epoch}** · validation top-1 {accuracy} · "
            f"running on {next(model.parameters()).device}")

def classify_uploads(payloads, model, config):
    """The web app's batched handler: file payloads in; (top-k labels, messages, overlays) out."""
    results = [(None, NO_IMAGE_MESSAGE, None)] * len(payloads)  # each: label, message, overlay
    decoded = {}  # slot: (model input, photo at CAM_SIZE)
    for slot, payload in enumerate(payloads):
        # preprocess=False: a payload is Gradio's file description (None once the image is cleared).
        if not payload or not payload.get("path"):
            continue
        try:
            if Path(payload["path"]).stat().st_size > MAX_UPLOAD_BYTES:
                raise googlenet.ImageTooLargeError(f"larger than {MAX_UPLOAD_BYTES >> 20} MB")
            decoded[slot] = (load_image(payload["path"], config),
                             load_image(payload["path"], config, CAM_SIZE))
        except Exception as err:  # decoded one by one, so a bad file fails only its own request
            results[slot] = (None, refusal(payload, err), None)
    if decoded:
        inputs = torch.stack([model_input for model_input, _ in decoded.values()])
        probs, cams = googlenet.predict_with_cam(model, config, inputs)
        # gr.AnnotatedImage's value: the photo, and the map (0..1) at its size times CAM_OPACITY.
        cams = torch.nn.functional.interpolate(cams[:, None], CAM_SIZE, mode="bilinear")[:, 0]
        for slot, row, cam in zip(decoded, probs, CAM_OPACITY * cams):
            label = top_k(row, config.class_names)
            photo = decoded[slot][1].permute(1, 2, 0).numpy()
            results[slot] = (label, "", (photo, [(cam.numpy(), next(iter(label)))]))
    return [list(column) for column in zip(*results)]  # a batch's answer: a list per output

def refusal(payload, err: Exception) -> str:
    """The message an upload that could not be classified gets (and a line in the server's log)."""
    print(f"demo: refused upload {payload.get('orig_name')!r}: {err}", file=sys.stderr)
    name = plain(payload.get("orig_name") or Path(payload["path"]).name)
    if isinstance(err, googlenet.ImageTooLargeError):
        return (f"**{name} is too large**: please send one under {MAX_UPLOAD_BYTES >> 20} MB and "
                f"{MAX_UPLOAD_PIXELS // 10**6} megapixels.")
    return f"**Could not read {name} as an image.** Please upload a photo (JPEG, PNG, WebP, ...)."

def batch_size(config) -> int:
    """Requests per batch: fewer for inputs over 256x256, so a burst's memory stays bounded."""
    side = max(config.source_size, config.image_size)
    return max(1, min(MAX_BATCH_SIZE, MAX_BATCH_SIZE * 256**2 // side**2))

def write_gradio_cache_atomically():
    """Gradio (6.31 too) rewrites a cached output image, named by its content's hash, in place: two
    identical answers at once truncate a file being served. Write each file once, by rename."""
    from gradio import processing_utils

    def save_pil_to_cache(img, cache_dir, name="image", format="webp"):
        data = processing_utils.encode_pil_to_bytes(img, format)
        path = Path(cache_dir).resolve() / processing_utils.hash_bytes(data) / f"{name}.{format}"
        if not path.exists():
            path.parent.mkdir(exist_ok=True, parents=True)
            temporary = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, path)
        return str(path)

    processing_utils.save_pil_to_cache = save_pil_to_cache

def build_demo(model, config, checkpoint_path=None, checkpoint: dict | None = None):
    """The Gradio app (not launched), its queue configured: a "Classify" tab (endpoint /predict:
    image file in, (top-5, message, map overlay) out) and a "Training" tab of the run's curves."""
    import gradio as gr

    write_gradio_cache_atomically()
    # One inference thread: each of Gradio's 40 handler threads would grow its own OpenMP pool.
    inference_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="googlenet-demo")

    def classify(payloads):  # batched: one upload per queued request
        return inference_thread.submit(classify_uploads, payloads, model, config).result()

    def training_view():
        history = read_history(checkpoint_path, checkpoint)
        return describe_run(history, checkpoint), *curves(history)

    def open_training():  # refreshes run only while the Training tab is open
        return gr.Timer(active=True), *training_view()

    with gr.Blocks(title="GoogLeNet demo", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:  # uploads go after an hour, not pile up
        gr.Markdown("## What does this GoogLeNet see?\n" + page_header(model, config))
        with gr.Tab("Classify") as classify_tab:
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Image", type="filepath", elem_id="image")
                    message = gr.Markdown(label="Message", elem_id="message")
                label = gr.Label(label=f"Top-{TOP_K}", num_top_classes=TOP_K, elem_id="prediction")
                overlay = gr.AnnotatedImage(label="Where it looked: the top class's activation map",
                                            format="jpeg", elem_id="cam")
        with gr.Tab("Training", elem_id="training-tab") as training_tab:
            summary = gr.Markdown(elem_id="run-summary")
            with gr.Row():
                plots = [gr.LinePlot(x="epoch", y="value", color="series", title=title,
                                     elem_id=f"{name}-plot") for name, (title, _) in PLOTS.items()]
        outputs = [summary, *plots]
        timer = gr.Timer(REFRESH_SECONDS, active=False)
        # Only visitors who open the Training tab read metrics.jsonl, one at a time through the
        # queue (a direct /gradio_api/run call runs at once, beside them: the read keeps no state).
        queued = {"api_visibility": "private", "concurrency_limit": 1, "concurrency_id": "training"}
        training_tab.select(open_training, outputs=[timer, *outputs], **queued)
        classify_tab.select(lambda: gr.Timer(active=False), outputs=timer, **queued)
        timer.tick(training_view, outputs=outputs, trigger_mode="always_last", **queued)
        # change (not upload): clearing the image updates the prediction too.
        image.change(classify, inputs=image,
                     outputs=[label, message, overlay], api_name="predict", preprocess=False,
                     batch=True, max_batch_size=batch_size(config), concurrency_limit=1,
                     trigger_mode="always_last")
    return demo.queue(max_size=MAX_QUEUE_SIZE)

def classify_files(paths, model, config) -> int:
    """No web app: the top-5 of each image printed; a bad image is one line on stderr. Exit code."""
    status = 0
    for path in paths:
        try:
            result = predict(path, model, config)
        except googlenet.UserError as err:
            print(f"error: {googlenet.printable(err)}", file=sys.stderr)
            status = 2
            continue
        print(path)
        for rank, (name, prob) in enumerate(result.items(), start=1):
            print(f"  {rank}. {prob:6.1%}  {name}")
    return status

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message, for main() to print
        raise googlenet.UserError(f"{message} (see python demo.py --help)")

def main(argv=None) -> int:
    parser = _Parser(description="Classify photos with a trained GoogLeNet (a web app, or top-5).")
    add = parser.add_argument
    add("images", nargs="*", type=Path, help="image files to classify here (no web app)")
    add("--checkpoint", type=Path, default=Path("runs/tiny/best.safetensors"),
        help="checkpoint to serve (default %(default)s: what README's first run writes)")
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=7860, help="port to listen on (default 7860)")
    add("--share", action="store_true", help="also open a public gradio.live link")
    try:
        args = parser.parse_args(argv)
        checkpoint = googlenet.load_checkpoint(args.checkpoint)  # checked whole: weights, metadata
        model, config = googlenet.model_from_checkpoint(checkpoint)
    except googlenet.UserError as err:
        print(f"error: {googlenet.printable(err)}", file=sys.stderr)
        return 2
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    if args.images:
        return classify_files(args.images, model, config)
    # A stopping Gradio server deletes every file it cached (named by content), shared or not.
    cache = private_folder("googlenet-demo-cache-", os.environ.get("GRADIO_TEMP_DIR"))
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # read when gradio is imported, in build_demo
    demo = build_demo(model, config, args.checkpoint, checkpoint)
    # SIGTERM (kill, systemd) stops the server like Ctrl-C: atexit then removes the cache folder.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                    max_file_size=MAX_UPLOAD_BYTES)
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C before Gradio's own wait loop: a normal stop
        return 0
    except (OSError, OverflowError):  # Gradio's message talks of its parameters, not our flags
        print(f"error: cannot serve on {args.host}:{args.port}: the port is taken or the address "
              "is not this machine's; choose another with --port or --host", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
