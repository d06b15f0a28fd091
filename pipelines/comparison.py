"""The compare pipeline: config -> data -> ``scalekd compare`` (teacher and warm student once, each variant over
paired seeds, the report). The same parameters as the command."""

from components.compare import compare
from components.prepare_data import prepare_data
from pipelines.tasks import Pods
from pipelines.training import config_task, run_pipeline


def build(cluster: bool, gpu: bool = False):
    pods = Pods(cluster, gpu)

    def comparison(v: dict):
        config = pods.light(config_task(v)).outputs["config"]
        data = pods.light(prepare_data(config=config, dataset_uri=v["dataset_uri"], workdir=v["workdir"],
                                       synth_images=v["synth_images"]), cached=False).outputs["dataset"]
        pods.training(compare(config=config, dataset=data, workdir=v["workdir"], seeds=v["seeds"],
                              variants=v["variants"], eval_split=v["eval_split"],
                              max_detections=v["max_detections"]), v)

    return run_pipeline("scalekd-compare", "Does the 2x teacher help on this dataset? Paired seeds of the plain "
                        "student, ScaleKD and the no-teacher control (or any variants), with a report",
                        {"dataset_uri": (str, ""), "workdir": (str, "runs/compare-pipeline"), "preset": (str, "demo"),
                         "synth_images": (int, 240), "seeds": (list, [0, 1, 2]),
                         "variants": (list, ["plain", "scalekd", "scalekd_no_teacher"]), "eval_split": (str, "val"),
                         "max_detections": (int, 100), **pods.parameters()}, comparison)
