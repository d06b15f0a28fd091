from kfp import dsl
from kfp.dsl import Artifact, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_config(preset: str, params: dict, overrides: list, config: Output[Artifact]):
    """Validate the run's configuration once (``params``: the run parameters of ``scalekd.params``, "" keeps the
    preset's value); later stages read it."""
    from scalekd.stages import resolve_config as run

    config.metadata["config"] = run(config.path, preset, params, overrides)
