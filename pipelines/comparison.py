"""The compare pipeline: config -> data -> ``scalekd compare`` (teacher and warm student once, each variant over
paired seeds, the report). The same parameters as the command."""

from kfp import dsl

from components.compare import compare
from components.prepare_data import prepare_data
from pipelines.training import for_cluster, preset_config


def build(cluster: bool):
    wrap = for_cluster if cluster else (lambda task: task)

    @dsl.pipeline(name="scalekd-compare", description="Does the 2x teacher help on this dataset? Paired seeds of "
                  "the plain student, ScaleKD and the no-teacher control (or any variants), with a report")
    def comparison(dataset_uri: str = "", workdir: str = "runs/compare-pipeline", preset: str = "demo",
                   synth_images: int = 240, seeds: list = [0, 1, 2],  # noqa: B006 - kfp needs a literal default
                   variants: list = ["plain", "scalekd", "scalekd_no_teacher"],  # noqa: B006
                   eval_split: str = "val", max_detections: int = 100, ray_address: str = "", workers: int = 0,
                   overrides: list = []):  # noqa: B006
        config = wrap(preset_config(preset, ray_address, workers, overrides)).outputs["config"]
        data = wrap(prepare_data(config=config, dataset_uri=dataset_uri, workdir=workdir,
                                 synth_images=synth_images)).outputs["dataset"]
        wrap(compare(config=config, dataset=data, workdir=workdir, seeds=seeds, variants=variants,
                     eval_split=eval_split, max_detections=max_detections).set_caching_options(False))

    return comparison
