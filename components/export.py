from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(config: Input[Artifact], dataset: Input[Dataset], distilled: Input[Model], workdir: str,
           exported: Output[Model]):
    """TorchScript and ONNX of the student alone, parity-checked against eager, with a model card."""
    from scalekd.stages import export as run

    exported.metadata.update(run(config.path, dataset.metadata["root"], distilled.metadata["uri"], workdir,
                                 exported.path))
