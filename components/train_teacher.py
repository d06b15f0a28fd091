from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_teacher(config: Input[Artifact], dataset: Input[Dataset], workdir: str, teacher: Output[Model]):
    """Train the teacher at teacher_scale (2x) the student's resolution, on Ray Train."""
    from scalekd.stages import train

    teacher.metadata.update(train(config.path, "teacher", dataset.metadata["root"], workdir, teacher.path))
