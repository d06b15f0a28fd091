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
