from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(config: Input[Artifact], dataset: Input[Dataset], teacher: Input[Model], plain: Input[Model],
             distilled: Input[Model], workdir: str, metrics: Output[Metrics], report: Output[Markdown],
             figures: Output[HTML], results: Output[Artifact]):
    """COCO metrics of teacher, plain student and ScaleKD student on one val set, with a report."""
    from scalekd.stages import evaluate as run
    from scalekd.storage import json_text

    out = run(config.path, dataset.metadata["root"], {"teacher": teacher.metadata["uri"],
              "plain student": plain.metadata["uri"], "ScaleKD student": distilled.metadata["uri"]},
              workdir, figures.path + ".d")
    for row in out["models"]:
        for key in ("AP", "AP50", "AP_S", "AP_M", "AP_L"):
            metrics.log_metric(f"{row['model']}/{key}", row[key])
    with open(report.path, "w") as f:
        f.write(out["markdown"] + "\n")
    with open(figures.path, "w") as f:
        f.write("<html><body>" + "".join(f'<img src="{n}">' for n in ("ap_by_size.png", "pr_curves.png",
                                                                        "examples.png")) + "</body></html>")
    with open(results.path, "w") as f:
        f.write(json_text(out, indent=2))
    results.metadata["report"] = out["report"]
