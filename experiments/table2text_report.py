"""docs/table2text.md and its plot from the rows ``table2text.py`` collects (mean ± std over seeds, verdicts)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from table2text import LABELS, LRS, PAPER, SYSTEMS, mean_std, plan

from prefixtune.files import atomic_write_text

COMMANDS = """    python experiments/table2text.py            # the runs (resumable, two worker processes)
    python experiments/table2text.py --no-run   # this page, its plot and the CSV, from the finished runs"""
SETS = [("webnlg", "seen"), ("webnlg", "unseen"), ("webnlg", "all"), ("dart", "all"), ("e2e", "all")]
METRICS = {"webnlg": ["BLEU", "METEOR", "TER"], "dart": ["BLEU", "METEOR", "TER"],
           "e2e": ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]}
SCALE = {"e2e": 100.0}  # the E2E scorer gives BLEU in 0-1; shown 0-100 like the others


def _runs(rows: list[dict[str, Any]], data: str, system: str) -> dict[int, dict[str, Any]]:
    """The finished runs of ``system`` on ``data``, by seed."""
    return {r["seed"]: r for r in rows if r["data"] == data and r["system"] == system}


def _values(runs: dict[int, dict[str, Any]], subset: str, metric: str, data: str) -> list[float]:
    key = f"test_{subset}_{metric}"
    scale = SCALE.get(data, 1.0) if metric == "BLEU" else 1.0
    return [runs[s][key] * scale for s in sorted(runs) if runs[s].get(key) is not None]


def paired(rows: list[dict[str, Any]], data: str, subset: str, a: str, b: str) -> list[float]:
    """BLEU(a) - BLEU(b) per seed, over the seeds both finished (a seed's training subset is shared)."""
    ra, rb = _runs(rows, data, a), _runs(rows, data, b)
    key = f"test_{subset}_BLEU"
    scale = SCALE.get(data, 1.0)
    return [(ra[s][key] - rb[s][key]) * scale for s in sorted(set(ra) & set(rb))]


MIN_SEEDS = 3  # fewer paired seeds give no verdict, only the direction they lean


def _too_few(diffs: list[float], claim_sign: int) -> str:
    if not diffs:
        return "not run yet"
    mean = statistics.mean(diffs)
    spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    lean = "" if claim_sign == 0 else ("; leans for" if mean * claim_sign > 0 else "; leans against")
    return f"cannot tell with {len(diffs)} seed(s) ({mean:+.1f}{spread} BLEU{lean})"


def verdict(diffs: list[float], claim_sign: int) -> str:
    """``holds`` when every seed's paired difference has the claimed sign and their mean exceeds their std;
    ``does not hold`` when the same is true of the opposite sign; else ``cannot tell with these seeds``."""
    if len(diffs) < MIN_SEEDS:
        return _too_few(diffs, claim_sign)
    mean, std = statistics.mean(diffs), statistics.stdev(diffs)
    for sign, word in ((claim_sign, "holds"), (-claim_sign, "does not hold")):
        if all(d * sign > 0 for d in diffs) and abs(mean) > std:
            return f"{word} ({mean:+.1f} ± {std:.1f} BLEU over {len(diffs)} seeds)"
    return f"cannot tell with these seeds ({mean:+.1f} ± {std:.1f} BLEU over {len(diffs)} seeds)"


def tie_verdict(diffs: list[float], margin: float = 1.0) -> str:
    """For "a and b are within ``margin`` BLEU": ``holds`` when |mean| + std of the paired differences is within
    the margin, ``does not hold`` when every seed has the same sign and |mean| - std exceeds it."""
    if len(diffs) < MIN_SEEDS:
        return _too_few(diffs, 0)
    mean, std = statistics.mean(diffs), statistics.stdev(diffs)
    summary = f"{mean:+.1f} ± {std:.1f} BLEU over {len(diffs)} seeds"
    if abs(mean) + std <= margin:
        return f"holds ({summary})"
    if (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)) and abs(mean) - std > margin:
        return f"does not hold ({summary})"
    return f"cannot tell with these seeds ({summary})"


def _main_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| system | WebNLG seen | WebNLG unseen | WebNLG all | DART | E2E |",
             "|---|---:|---:|---:|---:|---:|"]
    for system in SYSTEMS:
        cells = [mean_std(_values(_runs(rows, data, system), subset, "BLEU", data)) for data, subset in SETS]
        lines.append(f"| {LABELS[system]} | " + " | ".join(cells) + " |")
    for name, paper in PAPER.items():
        lines.append(f"| *paper, GPT-2-medium, {name}* | {paper['seen']} | {paper['unseen']} | {paper['all']} "
                     f"| {paper['dart']} | – |")
    return lines


def _detail_table(rows: list[dict[str, Any]], data: str, subsets: list[str]) -> list[str]:
    metrics = METRICS[data]
    head = [f"{s} {m}" if len(subsets) > 1 else m for s in subsets for m in metrics]
    if not any(_runs(rows, data, system) for system in SYSTEMS):
        return ["Not run yet (see the status below)."]
    lines = ["| system | lr | " + " | ".join(head) + " | trainable params |",
             "|---|---:|" + "---:|" * len(head) + "---:|"]
    for system in SYSTEMS:
        runs = _runs(rows, data, system)
        if not runs:
            continue
        cells = [mean_std(_values(runs, s, m, data), 1 if m in ("BLEU", "NIST") else 3) for s in subsets
                 for m in metrics]
        first = next(iter(runs.values()))
        lines.append(f"| {LABELS[system]} | {first['lr']:g} | " + " | ".join(cells)
                     + f" | {first['trainable_parameters']:,} |")
    return lines


def _status(rows: list[dict[str, Any]]) -> str:
    done = {r["key"] for r in rows}
    missing = [spec for spec in plan() if spec.key not in done]
    if not missing:
        return f"All {len(done)} planned runs are finished."
    left = sorted({f"{spec.data} {spec.system}" for spec in missing})
    return (f"{len(done)} of {len(done) + len(missing)} planned runs are finished (a run here takes 25-30 minutes "
            f"of a core: 15 of training, 10-12 of beam-5 decoding). Not yet run, in the plan's order of priority: "
            f"{', '.join(left)}; the first command above resumes the grid where it stopped.")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.26
    for i, system in enumerate(SYSTEMS):
        means, errs = [], []
        for data, subset in SETS:
            values = _values(_runs(rows, data, system), subset, "BLEU", data)
            means.append(statistics.mean(values) if values else 0.0)
            errs.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.bar([x + (i - 1) * width for x in range(len(SETS))], means, width, yerr=errs, capsize=3,
               label=LABELS[system])
    ax.set_xticks(range(len(SETS)), [f"{d} {s}" if d == "webnlg" else d for d, s in SETS])
    ax.set_ylabel("test BLEU (beam 5)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], doc: Path) -> None:
    """Write ``doc`` (and ``img/table2text_bleu.png`` beside it) from the collected rows."""
    img = doc.parent / "img" / "table2text_bleu.png"
    if rows:
        _plot(rows, img)
    unseen_gap = [u - s for u, s in zip(paired(rows, "webnlg", "unseen", "prefixtune", "finetune"),
                                        paired(rows, "webnlg", "seen", "prefixtune", "finetune"), strict=True)]
    claims = [
        ("On unseen WebNLG categories, prefix tuning beats fine-tuning",
         verdict(paired(rows, "webnlg", "unseen", "prefixtune", "finetune"), +1)),
        ("On seen WebNLG categories, fine-tuning is at least as good as prefix tuning (paper: 64.2 vs 62.9)",
         verdict(paired(rows, "webnlg", "seen", "finetune", "prefixtune"), +1)),
        ("Prefix tuning loses less than fine-tuning from seen to unseen categories (extrapolation)",
         verdict(unseen_gap, +1)),
        ("On DART, prefix tuning and fine-tuning are within a point (paper: 46.4 vs 46.2)",
         tie_verdict(paired(rows, "dart", "all", "prefixtune", "finetune"))),
        ("On E2E, prefixtune beats PEFT's prefix tuning at the same budget (otherwise: a tie)",
         verdict(paired(rows, "e2e", "all", "prefixtune", "peft"), +1)),
    ]
    out = [
        "# The paper's other tables: WebNLG seen/unseen, DART and E2E with beam 5",
        "",
        "Li & Liang (2021), Table 1: prefix tuning generalizes to WebNLG categories never seen in training far "
        "better than fine-tuning, and ties it on DART. The same comparison at a size a 2-core CPU allows, with "
        "SmolLM2-135M-Instruct. Every system trains on the same 320 examples per seed (a seeded shuffle; "
        "WebNLG train holds only the seen categories; DART trains on its dev split, as the shared data has no "
        "DART train split) for one epoch: 40 optimizer steps of batch 8 grouped by length, AdamW, 4 warm-up "
        "steps, linear decay. prefixtune: P = 10 with an MLP (h = 512), initialized from the frozen model's "
        "activations of the task words \"table-to-text: describe these facts:\" (E2E: \"... the restaurant:\"); "
        "PEFT: P = 10, projection h = 512; full fine-tuning: every weight. Learning rates "
        f"{LRS} are the ones `quality_e2e.py` chose on E2E **dev**; a sweep on WebNLG dev did not fit the CPU "
        "budget. Test: 100 sources per data set (WebNLG: 50 seen + 50 unseen categories, seeded draws), **beam "
        "search of width 5** as in the paper, 80 new tokens at most. WebNLG and DART are scored as the WebNLG "
        "challenge's evaluation does (BLEU 0-100, METEOR 0-1, TER: lower is better), E2E with the official E2E "
        "metrics (its BLEU shown ×100). Cells: mean ± std over the seeds listed. These sizes are what a 2-core "
        "CPU allows in a session (a WebNLG training step of batch 8 takes about 10 s on one core); no GPU was "
        "lent, so the paper's full-data setting is not here. Produced by:",
        "",
        COMMANDS,
        "",
        "Raw rows: [results/table2text.csv](results/table2text.csv).",
        "",
        "## BLEU (test, beam 5)",
        "",
        *_main_table(rows),
        "",
        f"![test BLEU per system](img/{img.name})",
        "",
        "## Verdicts",
        "",
        f"With at least {MIN_SEEDS} seeds, a claim **holds** when every seed's paired difference (same seed = "
        "same training subset) has the "
        "claimed sign and their mean exceeds their standard deviation; **does not hold** when that is true of "
        "the opposite sign; otherwise it **cannot be told** with these seeds. \"Within a point\" holds when the "
        "mean paired difference plus its standard deviation is at most 1 BLEU.",
        "",
        *[f"- {claim}: **{v}**." for claim, v in claims],
        "",
        "## WebNLG 2017 (seen / unseen categories)",
        "",
        *_detail_table(rows, "webnlg", ["seen", "unseen", "all"]),
        "",
        "## DART",
        "",
        *_detail_table(rows, "dart", ["all"]),
        "",
        "## E2E (first 100 test MRs, beam 5)",
        "",
        *_detail_table(rows, "e2e", ["all"]),
        "",
        "## Status of the grid",
        "",
        _status(rows),
        "",
    ]
    atomic_write_text(doc, "\n".join(out))
