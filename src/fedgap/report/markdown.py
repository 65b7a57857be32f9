"""The doctor's table and diagnosis as markdown (``gap.md``): for pasting into a README, a paper draft or an
issue thread."""

from __future__ import annotations

from fedgap.diagnose.gap import fmt_pct, status
from fedgap.runs.scores import LATE_EVALS


def render_markdown(res) -> str:
    lines = [
        f"Doctor preset `{res.preset.name}`, {res.timing()}. Command: `{res.command}`",
        "",
        "| # | variant | validation | test accuracy | last evaluation | gap (pp) | gap, equal samples (pp) | "
        "gap closed | rounds to target | chosen |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(res.rows, 1):
        reach = "-" if r.variant == "central" else (f"{r.rounds_to_target:.0f}" if r.rounds_to_target is not None
                                                    else "not reached")
        lines.append(
            f"| {i} | {r.label}{status(r)} | {fmt_pct(r.final_val_accuracy)} | "
            f"{fmt_pct(r.final_test_accuracy, r.final_std)} | "
            f"{fmt_pct(r.last_test_accuracy)} | "
            f"{'-' if r.gap_pp is None else f'{r.gap_pp:.2f}'} | "
            f"{'-' if r.gap_equal_samples_pp is None else f'{r.gap_equal_samples_pp:.2f}'} | "
            f"{'-' if r.gap_closed is None else f'{100 * r.gap_closed:.0f}%'} | {reach} | "
            f"{('`' + r.chosen + '`') if r.chosen else '-'} |")
    if res.recommended is not None:
        lines += ["", f"Recommended (highest validation accuracy): **{res.recommended.label}**, "
                      f"`recommended.yaml` (`{' '.join(res.recommended.overrides) or 'your setting'}`)."]
    lines += ["", "Ranked by validation accuracy (the only number the doctor chooses by). "
              f"Test accuracy: the mean of a run's last {LATE_EVALS} evaluations (gap and share closed use it). "
              f"Rounds to target: first evaluation at {fmt_pct(res.target)} ({res.target_source}).", ""]
    lines += [f"- **{f.title}.** {f.text}" for f in res.findings]
    if res.cut:
        lines += ["", f"This run leaves out: {res.cut}."]
    return "\n".join(lines) + "\n"
