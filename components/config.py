from kfp import dsl
from kfp.dsl import Artifact, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_config(preset: str, detector: str, student_backbone: str, teacher_backbone: str, student_size: int,
                   teacher_iterations: int, warmup_iterations: int, distill_iterations: int, alpha: float,
                   beta: float, gamma: float, ray_address: str, workers: int, gpu: bool, overrides: list,
                   config: Output[Artifact]):
    """Validate the run's configuration once (unset values keep the preset's); later stages read it."""
    from scalekd.stages import resolve_config as run

    params = dict(detector=detector, student_backbone=student_backbone, teacher_backbone=teacher_backbone,
                  student_size=student_size, teacher_iterations=teacher_iterations,
                  warmup_iterations=warmup_iterations, distill_iterations=distill_iterations, alpha=alpha,
                  beta=beta, gamma=gamma, ray_address=ray_address, workers=workers, gpu=gpu)
    config.metadata["config"] = run(config.path, preset, params, overrides)
