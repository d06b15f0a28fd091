"""The tune pipeline: config -> data -> teacher -> warm student -> Ray Tune over alpha/beta/gamma (or ``space``)."""

from components.tune import tune
from pipelines.tasks import Pods
from pipelines.training import run_pipeline, teacher_and_student


def build(cluster: bool, gpu: bool = False):
    pods = Pods(cluster, gpu)

    def tuning(v: dict):
        config, data, teacher, student = teacher_and_student(pods, v)
        workdir = v["workdir"]
        pods.training(tune(config=config, dataset=data, teacher=teacher.outputs["teacher"],
                           student=student.outputs["student"], workdir=workdir, trials=v["trials"], rungs=v["rungs"],
                           metric=v["metric"], space=v["space"]), v)

    return run_pipeline("scalekd-tune", "Ray Tune over the ScaleKD loss weights (ASHA on AP_S)",
                        {"dataset_uri": (str, ""), "workdir": (str, "runs/tune-pipeline"), "preset": (str, "demo"),
                         "synth_images": (int, 240), "trials": (int, 8), "rungs": (int, 2), "metric": (str, "AP_S"),
                         "space": (str, ""), **pods.parameters()}, tuning)
