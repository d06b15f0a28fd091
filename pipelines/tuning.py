"""The tune pipeline: config -> data -> teacher -> warm student -> Ray Tune over alpha/beta/gamma (or ``space``)."""

from components.prepare_data import prepare_data
from components.train_teacher import train_teacher
from components.tune import tune
from components.warmup_student import warmup_student
from pipelines.tasks import Pods
from pipelines.training import config_task, run_pipeline


def build(cluster: bool, gpu: bool = False):
    pods = Pods(cluster, gpu)

    def tuning(v: dict):
        config = pods.light(config_task(v)).outputs["config"]
        workdir = v["workdir"]
        data = pods.light(prepare_data(config=config, dataset_uri=v["dataset_uri"], workdir=workdir,
                                       synth_images=v["synth_images"]), cached=False).outputs["dataset"]
        teacher = pods.training(train_teacher(config=config, dataset=data, workdir=workdir), v)
        student = pods.training(warmup_student(config=config, dataset=data, workdir=workdir), v)
        pods.training(tune(config=config, dataset=data, teacher=teacher.outputs["teacher"],
                           student=student.outputs["student"], workdir=workdir, trials=v["trials"], rungs=v["rungs"],
                           metric=v["metric"], space=v["space"]), v)

    return run_pipeline("scalekd-tune", "Ray Tune over the ScaleKD loss weights (ASHA on AP_S)",
                        {"dataset_uri": (str, ""), "workdir": (str, "runs/tune-pipeline"), "preset": (str, "demo"),
                         "synth_images": (int, 240), "trials": (int, 8), "rungs": (int, 2), "metric": (str, "AP_S"),
                         "space": (str, ""), **pods.parameters()}, tuning)
