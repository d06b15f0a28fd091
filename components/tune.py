from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(config: Input[Artifact], dataset: Input[Dataset], teacher: Input[Model], student: Input[Model],
         workdir: str, trials: int, rungs: int, metric: str, space: str, best: Output[Artifact]):
    """Ray Tune (ASHA on a validation metric) over ``space`` (``scalekd tune --space``'s text; empty: alpha, beta
    and gamma around the paper's values); the best config as YAML."""
    import json

    from scalekd.stages import read_config
    from scalekd.storage import join, read_bytes
    from scalekd.tune import TuneSpace, run_tune

    cfg = read_config(config.path)
    out = run_tune(cfg, teacher.metadata["uri"], student.metadata["uri"], dataset.metadata["root"],
                   join(workdir, "tune"), TuneSpace.parse(space) if space else TuneSpace.around_paper(cfg),
                   trials=trials, metric=metric, rungs=rungs)
    with open(best.path, "wb") as f:
        f.write(read_bytes(out["best_config"]))
    best.metadata["summary"] = json.loads(json.dumps({k: v for k, v in out.items() if k != "table"}))
