from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compare(config: Input[Artifact], dataset: Input[Dataset], workdir: str, seeds: list, variants: list,
            eval_split: str, max_detections: int, metrics: Output[Metrics], report: Output[Markdown],
            results: Output[Artifact]):
    """``scalekd compare``: the 2x teacher and the warm student once, each variant over paired seeds, and the
    report (paired differences with 95% intervals, the verdict in words)."""
    from scalekd.stages import compare as run
    from scalekd.storage import json_text

    doc = run(config.path, dataset.metadata["root"], workdir, seeds, variants, eval_split, max_detections)
    for name, entry in doc["variants"].items():
        for key in ("AP", "AP_S", "AP_M"):
            values = [r[key] for r in entry["per_seed"] if key in r]
            if values:
                metrics.log_metric(f"{name}/{key}", sum(values) / len(values))
    with open(report.path, "w") as f:
        f.write(doc["markdown"])
    with open(results.path, "w") as f:
        f.write(json_text({k: v for k, v in doc.items() if k != "markdown"}, indent=2))
    results.metadata["report"] = doc["report"]
