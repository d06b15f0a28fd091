"""The report of ``scalekd compare``: ``report.json``, ``report.md`` and ``ap_s.png`` under the run's folder.

Paired by seed, with 95% intervals of the differences, and the verdict in words; beside it what explains a gain
that does not come (the teacher's own AP_S, the student's anchor coverage, AP per size band).
"""

from __future__ import annotations

import io
import statistics

from scalekd import storage
from scalekd.config import Config
from scalekd.eval.paired import paired_differences, paired_interval

OURS = "scalekd"
CONTROL = "scalekd_no_teacher"
# A teacher within this many AP_S points of the plain student has little to pass on.
TEACHER_MARGIN = 2.0


def coverage_summary(cfg: Config, annotations: str) -> dict:
    """``scalekd data stats`` of the evaluated split: object counts and the student's and teacher's anchor
    coverage per size band, at the sizes each model sees."""
    from scalekd.data.stats import coverage_for_config, dataset_stats

    return {"split_stats": dataset_stats(annotations), "anchor_coverage": coverage_for_config(annotations, cfg)}


def comparisons(results: dict[str, list[dict]]) -> list[dict]:
    """The compared variant (ScaleKD where it ran, else the first) minus each other variant, paired by seed."""
    ours = OURS if OURS in results else next(iter(results))
    out = []
    for theirs in results:
        if theirs == ours:
            continue
        entry: dict = {"ours": ours, "theirs": theirs, "metrics": {}}
        for key in _paired_keys(results[ours]):
            diffs = paired_differences(results[ours], results[theirs], key)
            if diffs:
                interval = paired_interval(diffs)
                entry["metrics"][key] = {"per_seed": diffs, "mean": round(statistics.mean(diffs), 3),
                                         "interval95": [round(x, 3) for x in interval] if interval else None}
        out.append(entry)
    return out


def _paired_keys(rows: list[dict]) -> list[str]:
    bands = [k for k in (rows[0] if rows else {}) if k.startswith("AP_") and k.endswith("px")]
    return ["AP_S", "AP", "AP_M", *bands]


def verdict(results: dict[str, list[dict]], reference: dict[str, dict], coverage: dict,
            paired: list[dict]) -> list[str]:
    """What a user needs to read, in sentences: what the teacher added, against what, and why not more."""
    lines = [_difference_sentence(c) for c in paired if "AP_S" in c["metrics"]]
    if not lines:
        lines.append("AP_S is not defined on this split (no small object), or fewer than one seed finished: "
                     "no paired verdict.")
    return lines + _diagnoses(results, reference, coverage)


def _difference_sentence(comparison: dict) -> str:
    ap_s, ours, theirs = comparison["metrics"]["AP_S"], comparison["ours"], comparison["theirs"]
    seeds = ", ".join(f"{d:+.2f}" for d in ap_s["per_seed"])
    if (ours, theirs) == (OURS, CONTROL):
        subject = f"The teacher adds {ap_s['mean']:+.2f} AP_S over the same recipe without it"
    else:
        subject = f"{ours} minus {theirs}: {ap_s['mean']:+.2f} AP_S"
    return f"{subject} (per seed {seeds}; {_spread(ap_s['interval95'])})."


def _spread(interval: list[float] | None) -> str:
    if interval is None:
        return "one seed: no interval"
    where = "above zero" if interval[0] > 0 else "below zero" if interval[1] < 0 else "within seed noise"
    return f"95% interval [{interval[0]:+.2f}, {interval[1]:+.2f}], {where}"


def _diagnoses(results: dict[str, list[dict]], reference: dict[str, dict], coverage: dict) -> list[str]:
    """Reasons a distillation cannot gain, read off the data and the reference models."""
    lines = []
    student = _mean(results.get("plain") or next(iter(results.values()), []), "AP_S")
    teacher = reference.get("teacher", {}).get("AP_S")
    if teacher is not None and student is not None:
        gap = teacher - student
        lines.append(f"The 2x teacher's AP_S is {teacher:.2f}, {gap:+.2f} over the "
                     f"{'plain' if 'plain' in results else 'first'} student's {student:.2f}"
                     + (": it has little to pass on; a better teacher (longer schedule, larger backbone) comes first."
                        if gap < TEACHER_MARGIN else "."))
    small = coverage["anchor_coverage"]["small_objects"]["student"]
    if small["covered_pct"] is not None:
        lines.append(f"The student's assignment gives {small['covered_pct']}% of the split's {small['objects']} "
                     "small objects a positive location at its input size"
                     + ("; the rest train as background, whatever the teacher knows (a larger data.student_size "
                        "or finer levels reach them)." if small["covered_pct"] < 90 else "."))
    return lines


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return round(statistics.mean(values), 3) if values else None


def write_report(request, cfg: Config, reference: dict[str, dict], results: dict[str, list[dict]],
                 coverage: dict, wall_s: float) -> dict:
    """report.json, report.md and ap_s.png under the run's folder; returns the JSON document."""
    paired = comparisons(results)
    doc = {"data": request.data, "eval_split": request.eval_split, "max_detections": request.max_detections,
           "seeds": [s for s in request.seeds if any(r["seed"] == s for rows in results.values() for r in rows)],
           "protocol": "teacher and warm student trained once; seeds vary the distillation",
           "reference": reference, "variants": {name: {"per_seed": rows} for name, rows in results.items()},
           "paired": paired, "verdict": verdict(results, reference, coverage, paired), "coverage": coverage,
           "config": cfg.to_dict(), "wall_s": round(wall_s)}
    storage.write_json(storage.join(request.out, "report.json"), doc)
    storage.write_text(storage.join(request.out, "report.md"), markdown(doc))
    _chart(doc, storage.join(request.out, "ap_s.png"))
    return doc


def markdown(doc: dict) -> str:
    rows = [(name, [metrics]) for name, metrics in doc["reference"].items()]
    rows += [(name, entry["per_seed"]) for name, entry in doc["variants"].items()]
    keys = [k for k in ("AP", "AP_S", "AP_M") if any(k in r for _, rs in rows for r in rs)]
    keys += [k for k in (rows[0][1][0] if rows and rows[0][1] else {}) if k.endswith("px")]
    lines = [f"# Does the 2x teacher help? ({doc['data']}, split {doc['eval_split']})", "",
             *[f"- {line}" for line in doc["verdict"]], "",
             f"Seeds {doc['seeds']} ({doc['protocol']}); metrics in %, mean ± std over seeds; detections per image "
             f"capped at {doc['max_detections']}.", "",
             "| model | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, per_seed in rows:
        cells = [_mean_std([r[k] for r in per_seed if k in r]) for k in keys]
        lines.append(f"| {name} | {len(per_seed) if name not in doc['reference'] else 'once'} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Paired differences (per seed, 95% interval)", "", "| compared | metric | per seed | mean | "
              "95% interval |", "|---|---|---|---|---|"]
    for c in doc["paired"]:
        for key, m in c["metrics"].items():
            interval = "-" if m["interval95"] is None else f"[{m['interval95'][0]:+.2f}, {m['interval95'][1]:+.2f}]"
            lines.append(f"| {c['ours']} - {c['theirs']} | {key} | {', '.join(f'{d:+.2f}' for d in m['per_seed'])} "
                         f"| {m['mean']:+.2f} | {interval} |")
    return "\n".join(lines + ["", _coverage_text(doc["coverage"]), ""])


def _coverage_text(coverage: dict) -> str:
    from scalekd.data.stats import format_stats

    stats = {**coverage["split_stats"], "anchor_coverage": coverage["anchor_coverage"]}
    return "## The evaluated split\n\n```\n" + format_stats(stats, "objects and anchor coverage") + "\n```"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"


def _chart(doc: dict, uri: str) -> None:
    """AP_S per model: the seeds' mean with their spread; the teacher and warm student as reference bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*doc["reference"], *doc["variants"]]
    rows = [[doc["reference"][n]] if n in doc["reference"] else doc["variants"][n]["per_seed"] for n in names]
    values = [[r["AP_S"] for r in rs if "AP_S" in r] or [0.0] for rs in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.5))
    ax.bar(range(len(names)), [statistics.mean(v) for v in values], yerr=[statistics.pstdev(v) for v in values],
           capsize=3, color=["#999999"] * len(doc["reference"]) + ["#3366aa"] * len(doc["variants"]))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("AP_S (%)")
    ax.set_title(f"AP_S on {doc['eval_split']} ({len(doc['seeds'])} seeds)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
