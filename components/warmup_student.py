from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def warmup_student(config: Input[Artifact], dataset: Input[Dataset], workdir: str, student: Output[Model]):
    """Warm up the student alone, its backbone frozen for the first iterations."""
    from scalekd.stages import train

    student.metadata.update(train(config.path, "warmup", dataset.metadata["root"], workdir, student.path))
