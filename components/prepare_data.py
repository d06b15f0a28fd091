from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(config: Input[Artifact], dataset_uri: str, workdir: str, synth_images: int,
                 dataset: Output[Dataset]):
    """Validate a COCO dataset root, or generate synthetic small-object scenes when none is given."""
    from scalekd.stages import prepare_data as run

    dataset.metadata["root"] = run(config.path, dataset_uri, workdir, synth_images, dataset.path)
