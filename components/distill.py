from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(config: Input[Artifact], dataset: Input[Dataset], teacher: Input[Model], student: Input[Model],
            workdir: str, method: str, distilled: Output[Model]):
    """Distil from the warm student (method: scalekd, or none / fitnet / od for baselines)."""
    from scalekd.stages import train

    distilled.metadata.update(train(config.path, "distill", dataset.metadata["root"], workdir, distilled.path,
                                    name=f"distill-{method}", teacher_uri=teacher.metadata["uri"],
                                    student_uri=student.metadata["uri"], method=method))
