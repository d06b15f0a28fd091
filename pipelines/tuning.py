"""The tune pipeline: config -> data -> teacher -> warm student -> Ray Tune over alpha/beta/gamma (or ``space``)."""

from kfp import dsl

from components.prepare_data import prepare_data
from components.train_teacher import train_teacher
from components.tune import tune
from components.warmup_student import warmup_student
from pipelines.training import for_cluster, preset_config


def build(cluster: bool):
    wrap = for_cluster if cluster else (lambda task: task)

    @dsl.pipeline(name="scalekd-tune", description="Ray Tune over the ScaleKD loss weights (ASHA on AP_S)")
    def tuning(dataset_uri: str = "", workdir: str = "runs/tune-pipeline", preset: str = "demo",
               synth_images: int = 240, trials: int = 8, rungs: int = 2, metric: str = "AP_S",
               space: str = "", ray_address: str = "", workers: int = 0, overrides: list = []):  # noqa: B006
        config = wrap(preset_config(preset, ray_address, workers, overrides)).outputs["config"]
        data = wrap(prepare_data(config=config, dataset_uri=dataset_uri, workdir=workdir,
                                 synth_images=synth_images)).outputs["dataset"]
        teacher = wrap(train_teacher(config=config, dataset=data, workdir=workdir).set_caching_options(False))
        student = wrap(warmup_student(config=config, dataset=data, workdir=workdir).set_caching_options(False))
        wrap(tune(config=config, dataset=data, teacher=teacher.outputs["teacher"], student=student.outputs["student"],
                  workdir=workdir, trials=trials, rungs=rungs, metric=metric, space=space).set_caching_options(False))

    return tuning
