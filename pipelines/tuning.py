"""The tune pipeline: config -> data -> teacher -> warm student -> Ray Tune over alpha/beta/gamma (or ``space``)."""

from components.prepare_data import prepare_data
from components.train_teacher import train_teacher
from components.tune import tune
from components.warmup_student import warmup_student
from pipelines.training import config_task, for_cluster, run_pipeline


def build(cluster: bool):
    wrap = for_cluster if cluster else (lambda task: task)

    def tuning(v: dict):
        config = wrap(config_task(v)).outputs["config"]
        workdir = v["workdir"]
        data = wrap(prepare_data(config=config, dataset_uri=v["dataset_uri"], workdir=workdir,
                                 synth_images=v["synth_images"])).outputs["dataset"]
        teacher = wrap(train_teacher(config=config, dataset=data, workdir=workdir).set_caching_options(False))
        student = wrap(warmup_student(config=config, dataset=data, workdir=workdir).set_caching_options(False))
        wrap(tune(config=config, dataset=data, teacher=teacher.outputs["teacher"], student=student.outputs["student"],
                  workdir=workdir, trials=v["trials"], rungs=v["rungs"], metric=v["metric"], space=v["space"])
             .set_caching_options(False))

    return run_pipeline("scalekd-tune", "Ray Tune over the ScaleKD loss weights (ASHA on AP_S)",
                        {"dataset_uri": (str, ""), "workdir": (str, "runs/tune-pipeline"), "preset": (str, "demo"),
                         "synth_images": (int, 240), "trials": (int, 8), "rungs": (int, 2), "metric": (str, "AP_S"),
                         "space": (str, "")}, tuning)
