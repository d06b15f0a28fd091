"""The quality targets, judged from the headline file ``benchmarks/results/quality_headline.json`` (written by
``quality.py`` after every seed): a table of every variant (mean ± std over its seeds, the AP_S difference to the
default recipe paired by seed, with a 95% Student-t interval over those per-seed differences) and one verdict
line per target. Adds the verdict to the file.

A target is judged on the mean paired difference, as the targets state it; each verdict also says whether the 95%
interval excludes the threshold (``resolved``) or not: with 3 seeds the interval is the mean +- 4.30 standard
errors, so a margin is resolved only when the seeds agree closely.
``--ours`` judges another variant by the same targets (e.g. an option not in the default recipe); its verdict is
written under its own key, never in the default's place.

``--rename OLD=NEW`` (with ``--write``) names variants as a later default names them: when an option a file ran
under its own name becomes the default (``scalekd_crosskd`` became ``scalekd``, the earlier default
``scalekd_no_cross_head``), the file is written anew under ``--write`` with the renames applied together and
recorded in its ``renamed`` field; the numbers are the source file's, untouched.

    python benchmarks/headline.py [--file quality_headline.json] [--ours scalekd]
                                  [--rename scalekd=scalekd_no_cross_head --rename scalekd_crosskd=scalekd
                                   --write quality_headline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS, table
from scalekd import storage
from scalekd.eval.paired import interval_above as _above
from scalekd.eval.paired import interval_text as _interval_text
from scalekd.eval.paired import paired_differences as _paired

KEYS = ("AP", "AP50", "AP_S", "AP_M", "AP_L")

def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}" if values else "-"


def _resolved(diffs: list[float], threshold: float) -> str:
    """The interval and whether it is above ``threshold`` (what a verdict on the mean cannot say alone)."""
    if len(diffs) < 2:
        return "one seed, not resolved"
    return f"95% interval {_interval_text(diffs)}, {'resolved' if _above(diffs, threshold) else 'not resolved'}"


def rows(variants: dict, ours_name: str = "scalekd") -> list[dict]:
    ours = variants.get(ours_name, {}).get("per_seed", [])
    out = []
    for name, entry in variants.items():
        runs = entry["per_seed"]
        row = {"variant": name, "seeds": len(runs)}
        row.update({k: _mean_std([r[k] for r in runs if k in r]) for k in KEYS})
        if name not in (ours_name, "teacher"):  # the teacher runs at 2x: no student to pair it with
            diffs = _paired(ours, runs)
            row[f"{ours_name} AP_S minus this, per seed"] = ", ".join(f"{d:+.2f}" for d in diffs)
            row["95% interval"] = _interval_text(diffs)
        out.append(row)
    return out


def _beats(gains: list[float]) -> str:
    """'Beats' needs the paired interval above zero: a positive mean whose interval spans zero is a tie, not a win
    (a headline once called +0.03 over OD, interval [-0.54, +0.60], 'MET')."""
    if statistics.mean(gains) <= 0:
        return "NOT MET"
    return "MET" if _above(gains, 0.0) else "NOT SHOWN (a tie within the interval)"


def verdicts(variants: dict, ours_name: str = "scalekd") -> dict[str, str]:
    """One line per quality target for ``ours_name``; 'not assessed' where a variant did not run."""
    get = lambda name: variants.get(name, {}).get("per_seed", [])
    ours, plain, control = get(ours_name), get("plain"), get("scalekd_no_teacher")
    out = {}
    if ours and plain:
        params = sorted({r.get("params") for r in ours + plain})
        out["beats plain on AP_S by >= 2.0 (or 15%), every seed"] = _verdict(_plain_verdict, ours, plain)
        out["AP_M within 1 point of plain; identical parameters"] = _verdict(_ap_m_verdict, ours, plain, params,
                                                                             key="AP_M")
    if ours and control and ours_name != "scalekd_no_teacher":  # the control is not judged against itself
        out["beats the no-teacher control on AP_S by >= 1.0"] = _verdict(_control_verdict, ours, control)
    for baseline in ("fitnet", "od", "pkd", "crosskd"):
        ran = ours and get(baseline)
        out[f"beats {baseline} on AP_S"] = (_verdict(_baseline_verdict, ours, get(baseline)) if ran
                                            else "not assessed (not run)")
    return out


def _verdict(judge, ours: list[dict], theirs: list[dict], *extra, key: str = "AP_S") -> str:
    """``judge(paired differences on key, theirs, *extra)``, or 'not assessed' where
    no seed pairs the metric. Why: a report that raised here lost its table after hours of training (a
    division by zero on VisDrone's sample; a validation set without small objects has no AP_S at all)."""
    diffs = _paired(ours, theirs, key)
    if not diffs:
        return "not assessed (no seed where both have the metric: COCO gives none without an object of that size)"
    return judge(diffs, theirs, *extra)


def _plain_verdict(gains: list[float], plain: list[dict]) -> str:
    base = statistics.mean(r["AP_S"] for r in plain if "AP_S" in r)
    mean_gain = statistics.mean(gains)
    # 15% of a plain student that finds no small object (AP_S 0: VisDrone's sample) is no margin: 2.0 holds.
    threshold = min(2.0, 0.15 * base) if base > 0 else 2.0
    relative = f"{100 * mean_gain / base:+.1f}%" if base > 0 else "plain's AP_S is 0: no relative gain"
    met = mean_gain >= threshold and all(g > 0 for g in gains)
    return (f"{'MET' if met else 'NOT MET'}: {mean_gain:+.2f} ({relative}), per seed {gains}; "
            f"{_resolved(gains, threshold)}")


def _ap_m_verdict(diffs: list[float], plain: list[dict], params: list) -> str:
    dm = statistics.mean(diffs)
    return f"{'MET' if dm >= -1.0 and len(params) == 1 else 'NOT MET'}: AP_M {dm:+.2f}, parameters {params}"


def _control_verdict(gains: list[float], control: list[dict]) -> str:
    mean_gain = statistics.mean(gains)
    return (f"{'MET' if mean_gain >= 1.0 else 'NOT MET'}: {mean_gain:+.2f}, per seed {gains}; "
            f"{_resolved(gains, 1.0)}")


def _baseline_verdict(gains: list[float], baseline: list[dict]) -> str:
    return (f"{_beats(gains)}: {statistics.mean(gains):+.2f} over {len(gains)} paired seed(s); "
            f"{_resolved(gains, 0.0)}")


def renamed(doc: dict, renames: dict[str, str], source: str) -> dict:
    """``doc`` with its variants renamed (all at once, so a name may be freed and reused in one call) and the renames
    recorded; earlier verdicts are dropped, since they named the variants by their old names."""
    missing = [old for old in renames if old not in doc["variants"]]
    if missing:
        raise SystemExit(f"--rename: {source} has no variant {', '.join(missing)}; it has {', '.join(doc['variants'])}")
    variants = {renames.get(name, name): entry for name, entry in doc["variants"].items()}
    if len(variants) != len(doc["variants"]):
        raise SystemExit(f"--rename {renames}: two variants of {source} would share a name")
    kept = {k: v for k, v in doc.items() if not k.startswith("verdict")}
    record = [*doc.get("renamed", []), {"source": source, "renames": renames}]
    return {**kept, "variants": variants, "renamed": record}


def chart(variants: dict, path: str, title: str) -> None:
    """AP_S per variant: the seeds' mean, their spread as error bars, the seed count under each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in variants if n not in ("teacher", "warm")]
    values = [[r["AP_S"] for r in variants[n]["per_seed"]] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 3.5))
    ax.bar(range(len(names)), [statistics.mean(v) for v in values], yerr=[statistics.pstdev(v) for v in values],
           capsize=3)
    ax.set_xticks(range(len(names)), [f"{n}\n({len(v)} seeds)" for n, v in zip(names, values)], rotation=45,
                  ha="right", fontsize=8)
    ax.set_ylabel("AP_S (%)")
    ax.set_title(f"AP_S per variant ({title})")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--file", default="quality_headline.json")
    ap.add_argument("--ours", default="scalekd", help="the variant judged by the targets (default: the default recipe)")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="rename a variant (with --write; repeatable, applied together)")
    ap.add_argument("--write", help="write the (renamed) file and its verdicts under this name instead of --file")
    args = ap.parse_args()
    path = os.path.join(RESULTS, args.file)
    with open(path) as f:
        doc = json.load(f)
    if args.rename:
        if not args.write or not all("=" in r for r in args.rename):
            ap.error("--rename takes OLD=NEW and needs --write (the source file keeps its names)")
        doc = renamed(doc, dict(r.split("=", 1) for r in args.rename), args.file)
    if args.write:
        path = os.path.join(RESULTS, args.write)
    data = (f"{doc['synth_images']} synthetic images" if doc.get("dataset", "synth") == "synth"
            else f"dataset {doc['dataset']}")
    m = doc.get("machine", {})
    print(f"{doc['protocol']}; preset {doc['preset']}, {data}; metrics in %; measured on {m.get('cpu', '?')}, "
          f"{m.get('isa', 'ISA not recorded')}, {m.get('threads', '?')} threads (seeds pair within one machine's "
          "numerics)")
    if args.ours not in doc["variants"]:
        raise SystemExit(f"{args.file} has no variant {args.ours!r}; it has {', '.join(doc['variants'])}")
    columns = ["variant", "seeds", *KEYS, f"{args.ours} AP_S minus this, per seed", "95% interval"]
    print(table(rows(doc["variants"], args.ours), columns))
    key = "verdict" if args.ours == "scalekd" else f"verdict_{args.ours}"
    doc[key] = verdicts(doc["variants"], args.ours)
    print(f"targets judged for {args.ours}:")
    for target, line in doc[key].items():
        print(f"{target}: {line}")
    with open(path, "w") as f:
        f.write(storage.json_text(doc, indent=2))
    chart(doc["variants"], path.replace(".json", "_ap_s.png"), data)


if __name__ == "__main__":
    main()
