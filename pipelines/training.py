"""The training pipeline: config -> data -> teacher (2x) -> warm student -> plain and ScaleKD
distillation -> evaluation -> export."""

import inspect

from kfp import dsl

from components.config import resolve_config
from components.distill import distill
from components.evaluate import evaluate
from components.export import export
from components.prepare_data import prepare_data
from components.train_teacher import train_teacher
from components.warmup_student import warmup_student
from scalekd.params import parameter_names

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


def run_pipeline(name: str, description: str, own: dict[str, tuple[type, object]], body):
    """A kfp pipeline whose inputs are ``own`` (name: (type, default)), then every run parameter of
    ``scalekd.params`` (a string, "" = the preset's value: kfp's local runner cannot take a None default) and
    ``overrides``; ``body`` gets them all as one dict and wires the tasks. The run parameters are listed once, in
    scalekd.params, and every pipeline takes all of them."""
    names = [*own, *parameter_names(), "overrides"]

    def pipeline_func(*args):  # kfp calls a pipeline function with positional arguments
        return body(dict(zip(names, args)))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    inputs = [inspect.Parameter(n, kind, default=default, annotation=t) for n, (t, default) in own.items()]
    inputs += [inspect.Parameter(n, kind, default="", annotation=str) for n in parameter_names()]
    inputs.append(inspect.Parameter("overrides", kind, default=[], annotation=list))
    pipeline_func.__signature__ = inspect.Signature(inputs)
    pipeline_func.__annotations__ = {p.name: p.annotation for p in inputs}
    pipeline_func.__name__ = pipeline_func.__qualname__ = name.replace("-", "_")
    return dsl.pipeline(name=name, description=description)(pipeline_func)


def config_task(values: dict) -> dsl.PipelineTask:
    """The resolve-config task: the preset, the run parameters as given ("" = the preset's) and the overrides."""
    return resolve_config(preset=values["preset"], params={n: values[n] for n in parameter_names()},
                          overrides=values["overrides"])


def build(cluster: bool):
    wrap = for_cluster if cluster else (lambda task: task)

    def training(v: dict):
        config = wrap(config_task(v)).outputs["config"]
        data = wrap(prepare_data(config=config, dataset_uri=v["dataset_uri"], workdir=v["workdir"],
                                 synth_images=v["synth_images"])).outputs["dataset"]
        workdir = v["workdir"]
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

    return run_pipeline("scalekd-training", "ScaleKD: teacher at 2x, warm student, distillation, evaluation and "
                        "export", {"dataset_uri": (str, ""), "workdir": (str, "runs/pipeline"),
                                   "preset": (str, "demo"), "synth_images": (int, 240)}, training)
