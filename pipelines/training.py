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
from pipelines.tasks import Pods
from scalekd.params import parameter_names

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


def teacher_and_student(pods: Pods, v: dict) -> tuple:
    """The stages every training pipeline starts with: the config, the checked dataset, the 2x teacher and the warm
    student (their tasks; the first two as outputs)."""
    config = pods.light(config_task(v)).outputs["config"]
    workdir = v["workdir"]
    data = pods.light(prepare_data(config=config, dataset_uri=v["dataset_uri"], workdir=workdir,
                                   synth_images=v["synth_images"]), cached=False).outputs["dataset"]
    teacher = pods.training(train_teacher(config=config, dataset=data, workdir=workdir), v)
    student = pods.training(warmup_student(config=config, dataset=data, workdir=workdir), v)
    return config, data, teacher, student


def build(cluster: bool, gpu: bool = False):
    pods = Pods(cluster, gpu)

    def training(v: dict):
        config, data, teacher, student = teacher_and_student(pods, v)
        workdir = v["workdir"]
        plain = pods.training(distill(config=config, dataset=data, teacher=teacher.outputs["teacher"],
                                      student=student.outputs["student"], workdir=workdir, method="none")
                              .set_display_name("plain-student"), v)
        scalekd = pods.training(distill(config=config, dataset=data, teacher=teacher.outputs["teacher"],
                                        student=student.outputs["student"], workdir=workdir, method="scalekd")
                                .set_display_name("scalekd-distill"), v)
        evaluation = pods.light(evaluate(config=config, dataset=data, teacher=teacher.outputs["teacher"],
                                         plain=plain.outputs["distilled"], distilled=scalekd.outputs["distilled"],
                                         workdir=workdir))
        pods.light(export(config=config, dataset=data, distilled=scalekd.outputs["distilled"], workdir=workdir)
                   .after(evaluation))

    return run_pipeline("scalekd-training", "ScaleKD: teacher at 2x, warm student, distillation, evaluation and "
                        "export", {"dataset_uri": (str, ""), "workdir": (str, "runs/pipeline"),
                                   "preset": (str, "demo"), "synth_images": (int, 240), **pods.parameters()}, training)
