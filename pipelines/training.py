"""The training pipeline: config -> data -> teacher (2x) -> warm student -> plain and ScaleKD
distillation -> evaluation -> export."""

from kfp import dsl

from components.config import resolve_config
from components.distill import distill
from components.evaluate import evaluate
from components.export import export
from components.prepare_data import prepare_data
from components.train_teacher import train_teacher
from components.warmup_student import warmup_student

S3_SECRET = "scalekd-s3"  # k8s/secret-s3.example.yaml
S3_ENV = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
          "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"}


RAY_TOKEN_SECRET = "scalekd-ray-token"  # k8s/secret-ray-token.example.yaml; KubeRay's authOptions.secretName
RAY_CLIENT_LABEL = ("scalekd.io/ray-client", "true")  # admitted to the Jobs API by k8s/networkpolicy.yaml


def for_cluster(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Cluster-only settings: S3 credentials and the Ray cluster's token from their secrets, and the label the
    NetworkPolicy admits to the Jobs API. Training itself runs on the Ray cluster."""
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_ENV)
    kubernetes.use_secret_as_env(task, secret_name=RAY_TOKEN_SECRET, secret_key_to_env={"auth_token": "RAY_AUTH_TOKEN"})
    return kubernetes.add_pod_label(task, *RAY_CLIENT_LABEL)


def preset_config(preset: str, ray_address: str, workers: int, overrides: list) -> dsl.PipelineTask:
    """The resolve-config task of a pipeline that exposes no model or schedule parameters: the preset's values,
    where to train and the user's overrides."""
    return resolve_config(
        preset=preset, detector="", student_backbone="", teacher_backbone="", student_size=0, teacher_iterations=0,
        warmup_iterations=0, distill_iterations=0, alpha=-1.0, beta=-1.0, gamma=-1.0, ray_address=ray_address,
        workers=workers, gpu=False, overrides=overrides)


def build(cluster: bool):
    wrap = for_cluster if cluster else (lambda task: task)

    @dsl.pipeline(name="scalekd-training", description="ScaleKD: teacher at 2x, warm student, distillation, "
                  "evaluation and export")
    def training(dataset_uri: str = "", workdir: str = "runs/pipeline", preset: str = "demo",
                 synth_images: int = 240, detector: str = "", student_backbone: str = "",
                 teacher_backbone: str = "", student_size: int = 0, teacher_iterations: int = 0,
                 warmup_iterations: int = 0, distill_iterations: int = 0, alpha: float = -1.0,
                 beta: float = -1.0, gamma: float = -1.0, ray_address: str = "", workers: int = 0,
                 gpu: bool = False, overrides: list = []):  # noqa: B006 - kfp needs a literal default
        config = wrap(resolve_config(
            preset=preset, detector=detector, student_backbone=student_backbone, teacher_backbone=teacher_backbone,
            student_size=student_size, teacher_iterations=teacher_iterations, warmup_iterations=warmup_iterations,
            distill_iterations=distill_iterations, alpha=alpha, beta=beta, gamma=gamma, ray_address=ray_address,
            workers=workers, gpu=gpu, overrides=overrides)).outputs["config"]
        data = wrap(prepare_data(config=config, dataset_uri=dataset_uri, workdir=workdir,
                                 synth_images=synth_images)).outputs["dataset"]
        teacher = wrap(train_teacher(config=config, dataset=data, workdir=workdir).set_caching_options(False))
        student = wrap(warmup_student(config=config, dataset=data, workdir=workdir).set_caching_options(False))
        plain = wrap(distill(config=config, dataset=data, teacher=teacher.outputs["teacher"],
                             student=student.outputs["student"], workdir=workdir, method="none")
                     .set_caching_options(False).set_display_name("plain-student"))
        scalekd = wrap(distill(config=config, dataset=data, teacher=teacher.outputs["teacher"],
                               student=student.outputs["student"], workdir=workdir, method="scalekd")
                       .set_caching_options(False).set_display_name("scalekd-distill"))
        evaluation = wrap(evaluate(config=config, dataset=data, teacher=teacher.outputs["teacher"],
                                   plain=plain.outputs["distilled"], distilled=scalekd.outputs["distilled"],
                                   workdir=workdir))
        wrap(export(config=config, dataset=data, distilled=scalekd.outputs["distilled"], workdir=workdir)
             .after(evaluation))

    return training
