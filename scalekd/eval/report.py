"""The evaluation report: a metrics table (Markdown and JSON), AP by object size (PNG), precision-recall
curves (PNG), and validation images with ground truth and each model's predictions drawn."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image, ImageDraw

from scalekd import storage
from scalekd.data.coco import CocoDetection
from scalekd.eval.evaluate import ModelResult
from scalekd.eval.metrics import pr_curve

TABLE_COLUMNS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")


def band_keys(metrics: dict) -> list[str]:
    """The tiny-object bands present (``AP_0-8px``, ...), in the order they were evaluated."""
    return [k for k in metrics if k.startswith("AP_") and k.endswith("px")]


def _pct(value: float) -> str:
    return "-" if value < 0 else f"{100 * value:.1f}"


def metrics_table(results: list[ModelResult], markdown: bool = True) -> str:
    ar_keys = [k for k in results[0].metrics if k.startswith("AR") and k[2:].isdigit()] if results else []
    metric_cols = list(TABLE_COLUMNS) + (band_keys(results[0].metrics) if results else []) + ar_keys[-1:]
    cols = metric_cols + ["params (M)", "images/s"]
    rows = []
    for r in results:
        rows.append([r.name] + [_pct(r.metrics[c]) for c in metric_cols]
                    + [f"{r.parameters / 1e6:.2f}", f"{r.images_per_s:.1f}"])
    header = ["model"] + cols
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header)] + [fmt.format(*row) for row in rows])


def _save_figure(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def ap_by_size_chart(results: list[ModelResult], uri: str) -> None:
    keys = ["AP", *band_keys(results[0].metrics if results else {}), "AP_S", "AP_M", "AP_L"]
    fig, ax = plt.subplots(figsize=(7 + 0.8 * (len(keys) - 4), 3.6))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        values = [max(0.0, 100 * r.metrics[k]) for k in keys]
        bars = ax.bar([x + i * width for x in range(len(keys))], values, width, label=r.name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(keys))],
                  [k.replace("AP_", "AP ") for k in keys], fontsize=8)
    ax.set_ylabel("AP (%)")
    ax.set_title("AP by object size (tiny-object bands by side in px, then COCO's S/M/L)")
    ax.legend(fontsize=8)
    _save_figure(fig, uri)


def pr_chart(results: list[ModelResult], uri: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, area in zip(axes, ("all", "small")):
        for r in results:
            recall, precision = pr_curve(r.evaluator, 0.5, area)
            ax.plot(recall, precision, label=r.name)
        ax.set_title(f"precision-recall @IoU 0.5 ({area} objects)")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    _save_figure(fig, uri)


def draw_examples(results: list[ModelResult], dataset: CocoDetection, uri: str, images: int = 3,
                  score: float = 0.3) -> None:
    """A grid: one row per image, ground truth first, then each model's detections above ``score``."""
    cols = 1 + len(results)
    tiles = []
    for index in range(min(images, len(dataset))):
        image, target = dataset[index]
        base = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8"))
        scale = max(1, 256 // max(base.size))
        base = base.resize((base.width * scale, base.height * scale), Image.Resampling.NEAREST)
        row = []
        gt = base.copy()
        draw = ImageDraw.Draw(gt)
        for box in target["boxes"].tolist():
            draw.rectangle([v * scale for v in box], outline=(0, 255, 0))
        draw.text((2, 2), "ground truth", fill=(255, 255, 255))
        row.append(gt)
        for r in results:
            pred = base.copy()
            draw = ImageDraw.Draw(pred)
            for det in r.detections:
                if det["image_id"] == target["image_id"] and det["score"] >= score:
                    x, y, w, h = det["bbox"]
                    draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=(255, 60, 60))
            draw.text((2, 2), r.name, fill=(255, 255, 255))
            row.append(pred)
        tiles.append(row)
    if not tiles:
        return
    w, h = tiles[0][0].size
    sheet = Image.new("RGB", (w * cols, h * len(tiles)))
    for r_i, row in enumerate(tiles):
        for c_i, tile in enumerate(row):
            sheet.paste(tile, (c_i * w, r_i * h))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())


def write_report(results: list[ModelResult], dataset: CocoDetection, out: str, title: str = "scalekd report") -> dict:
    """Write report.md, metrics.json and the PNGs under ``out``; returns their URIs."""
    paths = {name: storage.join(out, name) for name in
             ("report.md", "metrics.json", "ap_by_size.png", "pr_curves.png", "examples.png")}
    ap_by_size_chart(results, paths["ap_by_size.png"])
    pr_chart(results, paths["pr_curves.png"])
    draw_examples(results, dataset, paths["examples.png"])
    storage.write_json(paths["metrics.json"], {"models": [r.row() for r in results]})
    md = [f"# {title}", "", f"Validation set: `{dataset.annotation_uri}` ({len(dataset)} images).",
          "Metrics in % (COCO; '-' where a size class has no objects); images/s measured at batch 1.", "",
          metrics_table(results), "", "![AP by object size](ap_by_size.png)", "",
          "![precision-recall](pr_curves.png)", "", "Green: ground truth. Red: detections (score >= 0.3).", "",
          "![examples](examples.png)", ""]
    storage.write_text(paths["report.md"], "\n".join(md))
    if not storage.is_s3(out):
        paths = {k: os.path.abspath(v) for k, v in paths.items()}
    return paths
