"""The methods registry: one class per method, found by name, driven by one distiller."""

import contextlib
import pathlib
import re

import pytest
import torch

from scalekd.config import ConfigError, replace
from scalekd.distill.methods import DistillMethod, base, method_class, method_names, register
from tests.helpers import distiller_with_optimizers, tiny_batch


def _phases(distiller, opt, batch) -> list[str]:
    seen = []

    @contextlib.contextmanager
    def phase(name):
        seen.append(name)
        yield

    distiller.train_step(batch, opt, phase=phase)
    return seen


@pytest.mark.parametrize("method, own_phase", [("fitnet", "fitnet"), ("pkd", "pkd"), ("od", "od"),
                                               ("crosskd", "crosskd")])
def test_a_baseline_is_timed_under_its_own_name_and_never_as_scalekds_parts(tiny_cfg, method, own_phase):
    distiller, opt = distiller_with_optimizers(replace(tiny_cfg, distill={"method": method}))
    phases = _phases(distiller, opt, tiny_batch(tiny_cfg))
    assert own_phase in phases
    assert not {"sdf", "csa_attention", "assistant_head", "losses"} & set(phases)


def test_scalekds_cross_head_terms_are_named_as_its_own_and_crosskds_as_crosskds(tiny_cfg):
    batch = tiny_batch(tiny_cfg)
    scalekd, opt = distiller_with_optimizers(replace(tiny_cfg, distill={"cross_head_weight": 1.0}))
    logs = scalekd.train_step(batch, opt)
    assert {"cross/cls", "cross/bbox", "kd/cls", "kd/bbox", "kd/feat"} <= set(logs)
    crosskd, opt = distiller_with_optimizers(replace(tiny_cfg, distill={"method": "crosskd"}))
    logs = crosskd.train_step(batch, opt)
    assert {"kd/cls", "kd/bbox"} <= set(logs) and not any(name.startswith("cross/") for name in logs)


def test_every_method_is_registered_and_an_unknown_one_is_refused_naming_them(tiny_cfg):
    assert set(method_names()) == {"none", "fitnet", "od", "pkd", "crosskd", "scalekd"}
    with pytest.raises(ConfigError, match="one of"):
        replace(tiny_cfg, distill={"method": "mgd"})
    with pytest.raises(KeyError, match="scalekd"):
        method_class("mgd")


@pytest.fixture
def toy_method():
    """A method added the way a new one is: one class, registered by name, nothing else edited."""

    @register
    class MeanMatch(DistillMethod):
        name = "mean_match"

        def __init__(self, distiller):
            super().__init__(distiller)
            self.scale = torch.nn.Parameter(torch.ones(()))

        def modules(self):
            holder = torch.nn.Module()
            holder.scale = self.scale
            return {"mean_match": holder}

        def student_modules(self):
            return [self.distiller.mean_match]

        def losses(self, student_out, teacher, opt, amp, phase):
            with phase("mean_match"):
                s = torch.stack([m.mean() for m in student_out.fpn])
                t = torch.stack([m.mean() for m in teacher[1]])
                return {"kd/feat": ((self.scale * s - t) ** 2).sum()}, {}

    yield MeanMatch
    base._REGISTRY.pop("mean_match")


def test_a_new_method_is_one_registered_class_and_trains_through_the_same_step(tiny_cfg, toy_method):
    cfg = replace(tiny_cfg, distill={"method": "mean_match"})
    distiller, opt = distiller_with_optimizers(cfg)
    before = distiller.mean_match.scale.detach().clone()
    phases = _phases(distiller, opt, tiny_batch(cfg))
    assert "mean_match" in phases and "mean_match.scale" in distiller.state_dict()
    assert not torch.equal(before, distiller.mean_match.scale.detach())  # stepped with the student


def test_no_module_outside_the_registry_branches_on_the_method_name():
    root = pathlib.Path(__file__).resolve().parent.parent / "scalekd"
    branching = re.compile(r"method\s*(==|!=)|method\s+(not\s+)?in\s*\(")
    found = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py") if "methods" not in path.parts
             for n, line in enumerate(path.read_text().splitlines(), 1) if branching.search(line)]
    assert found == [], found


def test_validating_a_config_reads_the_methods_without_loading_torch():
    import subprocess
    import sys

    code = ("import sys; from scalekd.config import load_config; cfg = load_config(preset='bench'); "
            "cfg.loss_weights(); print([m for m in ('torch', 'torchvision', 'ray') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
