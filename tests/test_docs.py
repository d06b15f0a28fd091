"""The README and docs/ as a user meets them: short, linked, and free of the project's internal process vocabulary
(numbered work items belong to the repository's history, not to its files)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Built from parts so that this file does not match itself.
PROCESS_WORDS = re.compile(r"\b(" + "|".join(("st" + "ops?", "iss" + "ues?")) + r")[ -][0-9]+\b", re.IGNORECASE)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""}


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if (REPO / n).suffix in TEXT_SUFFIXES and (REPO / n).is_file()
            and not n.startswith("benchmarks/results/")]


def test_no_tracked_file_speaks_of_numbered_work_items():
    hits = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if PROCESS_WORDS.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not hits, "say why in the file, keep the history in git:\n" + "\n".join(hits)


def test_the_readme_is_a_page_of_commands_that_opens_with_the_two():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make demo", "make test"]
    for heading in ("Your own data", "Does it help on my data?", "Tune", "Kubeflow Pipelines",
                    "A Ray cluster by hand", "KubeRay"):
        assert re.search(rf"^## .*{re.escape(heading)}", text, re.MULTILINE), heading


def test_every_relative_link_in_the_readme_and_docs_resolves():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"


def test_the_configuration_reference_is_generated_from_the_config_and_fresh():
    from scalekd.config_reference import reference_markdown

    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == reference_markdown() + "\n", "run `scalekd config --reference > docs/configuration.md`"
    undocumented = [line.split("|")[1].strip() for line in page.splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, f"say what these mean beside their fields in scalekd/config.py: {undocumented}"


def test_every_file_of_record_is_listed_with_its_command():
    index = (REPO / "benchmarks" / "results" / "README.md").read_text()
    listed = set(re.findall(r"`([\w.-]+\.(?:json|png|md))`", index))
    for prefix, choices, suffix in re.findall(r"`([\w-]*)\{([\w,]+)\}([\w.]*)`", index):
        listed |= {f"{prefix}{choice}{suffix}" for choice in choices.split(",")}
    names = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    unlisted = [n for n in names if Path(n).name not in listed | {"README.md"}]
    assert not unlisted, f"list these in benchmarks/results/README.md, or remove them: {unlisted}"


def _readme_commands() -> list[str]:
    """Every `scalekd ...` command in the README's code blocks, continuation lines joined, optional [parts] kept
    without their brackets and trailing comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command.startswith("scalekd ") or command.startswith("SCALEKD_IMAGE="):
                commands.append(re.sub(r"\[([^\]]*)\]", r"\1", command.split("scalekd ", 1)[1]))
    return commands


def test_every_readme_command_parses_with_the_real_command_line():
    import shlex

    from scalekd.cli import build_parser

    commands = _readme_commands()
    assert len(commands) >= 15
    for command in commands:
        words = shlex.split(command)
        try:
            build_parser().parse_args(words)
        except SystemExit as exc:
            raise AssertionError(f"README command does not parse: scalekd {command}") from exc


def _own_data_script(s3: dict, workdir: Path) -> str:
    """The README's own-data quickstart as a bash script for the tiny preset: the fixture's S3 server and
    credentials instead of the placeholders, stages in-process instead of on a local Ray (start-up time)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Your own data", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.replace("\\\n", " ").splitlines() if not line.startswith("export AWS_")]
    script = "\n".join(lines).replace("s3://my-bucket", f"s3://{s3['bucket']}").replace("--preset bench",
                                                                                         "--preset tiny")
    for stage in ("train-teacher", "warmup", "distill"):
        script = re.sub(rf"scalekd {stage}\b", f"scalekd {stage} --no-ray", script)
    return f"set -euo pipefail\ncd {workdir}\n{script}\n"


def _yolo_split(coco_file: Path, images: Path, out: Path) -> None:
    import json
    import shutil

    coco = json.loads(coco_file.read_text())
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    for image in coco["images"]:
        shutil.copy(images / image["file_name"], out / "images" / image["file_name"])
        rows = [f"{a['category_id'] - 1} {(a['bbox'][0] + a['bbox'][2] / 2) / image['width']:.6f} "
                f"{(a['bbox'][1] + a['bbox'][3] / 2) / image['height']:.6f} {a['bbox'][2] / image['width']:.6f} "
                f"{a['bbox'][3] / image['height']:.6f}" for a in coco["annotations"] if a["image_id"] == image["id"]]
        (out / "labels" / (Path(image["file_name"]).stem + ".txt")).write_text("\n".join(rows) + "\n")


def test_the_readme_own_data_quickstart_runs_as_written_on_tiny_data(s3, synth_root, tmp_path):
    import json
    import os
    import sys

    root = Path(synth_root)
    for split, name in (("train", "YOLO_TRAIN"), ("val", "YOLO_VAL")):
        _yolo_split(root / "annotations" / f"instances_{split}.json", root / "images", tmp_path / name)
    categories = json.loads((root / "annotations" / "instances_train.json").read_text())["categories"]
    assert [c["id"] for c in categories] == list(range(1, len(categories) + 1))
    (tmp_path / "classes.names").write_text("\n".join(c["name"] for c in categories) + "\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SCALEKD_NO_PROGRESS": "1"}
    proc = subprocess.run(["bash", "-c", _own_data_script(s3, tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from scalekd import storage

    run = f"s3://{s3['bucket']}/runs/r1"
    for name in ("distill/model.pt", "report/report.md", "export/model.onnx", "export/model_card.json"):
        assert storage.exists(f"{run}/{name}"), name


def test_the_readme_compare_quickstart_runs_as_written_on_tiny_data(s3, synth_root, tmp_path):
    """`scalekd compare` as the README gives it, on the tiny preset from S3 with two seeds and two variants
    (stages in-process: a local Ray per stage would add minutes)."""
    import os
    import sys

    from scalekd import storage

    data = f"s3://{s3['bucket']}/datasets/mydata"
    storage.upload_dir(synth_root, data)
    text = (REPO / "README.md").read_text()
    block = text.split("## Does it help on my data?", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    command = re.sub(r"\[([^\]]*)\]", r"\1", block.replace("\\\n", " ").strip())
    command = (command.replace("s3://my-bucket", f"s3://{s3['bucket']}").replace("--preset bench", "--preset tiny")
               .replace("--seeds 0 1 2", "--seeds 0 1").replace("scalekd_no_teacher od crosskd", "scalekd_no_teacher")
               .replace("scalekd compare", "scalekd compare --no-ray"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SCALEKD_NO_PROGRESS": "1"}
    proc = subprocess.run(["bash", "-c", f"set -euo pipefail; cd {tmp_path}; {command}"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "runs" / "compare" / "report.md").read_text()
    assert "scalekd - scalekd_no_teacher" in report and "The teacher adds" in proc.stdout
