"""The doctor's report: one self-contained HTML file (inline CSS, plots embedded as PNG data URIs, no scripts,
nothing fetched), readable offline and in a mail attachment. Layout: the headline numbers, the diagnosis, the
accuracy curves, the gap bars, the ranked table, the diagnostics of the naive run, the partition, and how to
reproduce; then what the preset left out."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from fedgap.data.partition import partition_text
from fedgap.diagnose.gap import fmt_pct, status
from fedgap.experiment import outputs
from fedgap.report import plots
from fedgap.runs.scores import LATE_EVALS

CSS = """
body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 18px}
.cards{display:flex;gap:14px;flex-wrap:wrap}
.card{background:#fff;border-radius:10px;padding:14px 18px;box-shadow:0 1px 3px #0002;min-width:170px;flex:1}
.card .v{font-size:26px;font-weight:650} .card .k{color:#666;font-size:13px}
.finding{background:#fff;border-left:4px solid #999;border-radius:6px;padding:10px 14px;margin:8px 0}
.finding.cause{border-color:#d62728} .finding.remedy{border-color:#2ca02c} .finding.caveat{border-color:#e6a100}
.finding b{display:block;margin-bottom:2px}
img{max-width:100%;background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002}
table{border-collapse:collapse;background:#fff;width:100%;font-size:13.5px;box-shadow:0 1px 3px #0002}
th,td{padding:6px 9px;border-bottom:1px solid #eee;text-align:right} th{background:#fafafa}
td:first-child,th:first-child,td.l,th.l{text-align:left}
tr.naive td{background:#fdecec} tr.central td{background:#eef2f7} tr.combined td{background:#eef7ee}
code,pre{font:12.5px ui-monospace,monospace;background:#eef0f3;border-radius:4px;padding:1px 4px}
pre{padding:10px;overflow-x:auto}
.muted{color:#777;font-size:13px}
"""


def _img(fig, alt: str) -> str:
    data = base64.b64encode(plots.png_bytes(fig)).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _e(x) -> str:
    return html.escape(str(x))


def _md_code(text: str) -> str:
    """Escape, then turn `backticks` into <code>."""
    parts = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _num(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(res) -> str:
    head = ('<tr><th>#</th><th class="l">variant</th><th class="l">cause</th>'
            f"<th>validation accuracy (selects)</th>"
            f"<th>test accuracy (last {LATE_EVALS} evaluations)</th><th>last evaluation</th><th>best accuracy</th>"
            "<th>gap (pp)</th><th>gap, equal samples (pp)</th><th>gap closed</th><th>rounds to target</th>"
            "<th>wall time (s)</th></tr>")
    body = []
    for i, r in enumerate(res.rows, 1):
        reach = (_num(r.rounds_to_target, "{:.0f}") + (f" ({r.reached}/{r.seeds})" if r.seeds > 1 else "")
                 if r.rounds_to_target is not None else "not reached")
        if r.variant == "central":
            reach = "-"
        closed = "-" if r.gap_closed is None else f"{100 * r.gap_closed:.0f}%"
        label = _e(r.label) + (f'<div class="muted"><code>{_e(r.changes)}</code></div>' if r.changes else "")
        if r.searched:
            label += f'<div class="muted">chosen from {_e(r.searched)}</div>'
        if res.recommended is not None and r.variant == res.recommended.key:
            label = "<b>recommended</b>: " + label
        if r.error:
            label += f'<div class="muted">failed: {_e(r.error)}</div>'
        elif r.diverged:
            label += f'<div class="muted">{_e(status(r).strip(" ()"))}: stopped at the first non-finite model</div>'
        body.append(
            f'<tr class="{_e(r.variant)}"><td>{i}</td><td class="l">{label}</td><td class="l">{_e(r.cause or "-")}</td>'
            f"<td>{fmt_pct(r.final_val_accuracy)}</td>"
            f"<td>{fmt_pct(r.final_test_accuracy, r.final_std)}</td><td>{fmt_pct(r.last_test_accuracy)}</td>"
            f"<td>{fmt_pct(r.best_test_accuracy, r.best_std)}"
            f"</td><td>{_num(r.gap_pp)}</td><td>{_num(r.gap_equal_samples_pp)}</td><td>{closed}</td>"
            f"<td>{reach}</td><td>{_num(r.wall_seconds, '{:.0f}')}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _tuning(res) -> str:
    """How the remedies were tuned: the stated budget, what was spent, the recommended file."""
    b = res.budget
    if not b:
        return ""
    rec = ""
    if res.recommended is not None:
        rec = (f" The winner is written to <code>recommended.yaml</code> (<code>fedgap run recommended.yaml</code>): "
               f"<code>{_e(' '.join(res.recommended.overrides) or 'your setting unchanged')}</code>.")
    return (f"<p>Every remedy was tuned on the validation split by successive halving: {_e(b['candidates'])} "
            f"candidates, compared after {_e(', '.join(str(r) for r in b['rungs']))} rounds, the best third kept "
            f"at each rung; budget {_e(b['planned_rounds'])} training rounds, {_e(b.get('trained_rounds', '-'))} "
            f"trained.{_combination_budget(b)}{rec}</p>")


def _combination_budget(b: dict) -> str:
    spent = b.get("combination_rounds")
    if not spent:
        return ""
    how = ("tuned each added remedy's own values again on top of the set (the set's client lr kept), by the same "
           "halving" if b.get("combination_retune", True) else
           "added each remedy at the values it was tuned to alone (not tuned again on top of the set; the set's "
           "client lr kept)")
    return f" The combination search {how}: {_e(spent)} more training rounds."


def _setting(cfg) -> str:
    d, m, c, s = cfg.data, cfg.model, cfg.client, cfg.server
    part = partition_text(d)
    return (f"{m.name} with {m.norm} norm on {d.name}, {part}, {d.num_clients} clients, "
            f"{s.clients_per_round} per round, {s.rounds} rounds; client {c.optimizer} lr {c.lr}, batch "
            f"{c.batch_size}, {c.epochs} local epoch(s); server {s.algorithm}")


def render(res) -> str:
    naive_rec = res.records["naive"][0]
    cfg = naive_rec.spec.cfg
    by = {r.variant: r for r in res.rows}
    central, naive = by.get("central"), by.get("naive")
    best = by.get(res.recommended.key) if res.recommended is not None else None  # chosen on validation
    cards = [
        ("centralized", fmt_pct(central.final_test_accuracy if central else None)),
        ("naive federated", fmt_pct(naive.final_test_accuracy if naive else None)),
        ("naive gap", f"{_num(naive.gap_pp if naive else None)} pp"),
    ]
    if best is not None:
        cards.append((f"recommended: {best.label}", f"{fmt_pct(best.final_test_accuracy)}"
                      + (f" <span class='muted'>({100 * best.gap_closed:.0f}% closed)</span>"
                         if best.gap_closed is not None else "")))
    cards_html = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v}</div></div>'
                         for k, v in cards)
    findings = "".join(f'<div class="finding {_e(f.kind)}"><b>{_e(f.title)}</b>{_md_code(f.text)}</div>'
                       for f in res.findings)

    label_of = {v.key: (v.label, v.cause) for v in res.variants}
    curves = []
    for v in res.variants:
        rec = next((r for r in res.records[v.key] if r.ok), None)
        if rec is None:
            continue
        total, pts = 0.0, []
        for row in rec.rows:
            total += float(row["samples"])
            if row.get("test_accuracy") is not None:
                pts.append((row["round"], row["test_accuracy"], total))
        curves.append((v.key, *label_of[v.key], pts))
    acc_img = _img(plots.accuracy_figure(curves, central.final_test_accuracy if central else None),
                   "test accuracy per round and per training sample")
    gap_img = _img(plots.gap_figure([(r.variant, r.label, r.gap_pp, 100 * r.final_std if r.final_std else None)
                                     for r in res.rows if r.variant != "central"]), "gap to centralized per variant")
    series = {k: [row.get(k) for row in naive_rec.rows] for k in naive_rec.rows[0]} if naive_rec.rows else {}
    layers = [k[len("bn_divergence["):-1] for k in series if k.startswith("bn_divergence[")]
    diag_img = _img(plots.diagnostics_figure(series, layers), "diagnostics of the naive run")
    title = f"{cfg.data.partition}" + (f" alpha={cfg.data.alpha}" if cfg.data.partition == "dirichlet" else "")
    heat_img = _img(plots.partition_heatmap_figure(res.heatmap_counts, title), "partition heatmap")
    p = res.partition
    cut = (f"<p><b>This run leaves out:</b> {_e(res.cut)}. "
           f"<code>fedgap doctor --preset full</code> runs everything to convergence.</p>" if res.cut else "")
    skipped = "".join(f"<li>{_e(s)}</li>" for s in res.skipped + res.notes)
    runs = "".join(f"<li><code>{_e(rec.run_dir.relative_to(res.out))}</code> {_e(label_of[k][0])}"
                   f"{' (reused)' if rec.cached else ''}</li>" for k, recs in res.records.items() for rec in recs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>fedgap doctor: {_e(cfg.model.name)} on {_e(cfg.data.name)}</title><style>{CSS}</style></head>
<body><main>
<h1>Why the federated model falls behind, and what fixes it</h1>
<p class="sub">{_e(_setting(cfg))}. Preset <b>{_e(res.preset.name)}</b>, {_e(len(res.variants))} variants,
{_e(res.timing())}.</p>
<div class="cards">{cards_html}</div>
<h2>Diagnosis</h2>{findings}
<h2>Accuracy</h2>{acc_img}
<p class="muted">Seed 0 of every variant. Colours: red = naive, black dashed = centralized,
{_e(plots.colour_legend())}.</p>
<h2>Gap to centralized training</h2>{gap_img}
<h2>Ranking</h2>{_tuning(res)}{_table(res)}
<p class="muted">Ranked by validation accuracy (data.validation, held out of the training set before
partitioning): the only number the doctor chooses by. Test accuracy = the mean of a run's last {LATE_EVALS}
evaluations (under label skew the global
model swings from one evaluation to the next, so one evaluation does not rank remedies); last evaluation shown
beside it. Gap = centralized final accuracy minus the variant's final accuracy. Equal samples: against the
centralized run after as many training samples as the variant processed. Gap closed = share of the naive gap.
Rounds to target: first evaluated round at {fmt_pct(res.target)} ({_e(res.target_source)}).</p>
<h2>Diagnostics of the naive run</h2>{diag_img}
<p class="muted">Measured on the global model at each evaluation round (definitions in
<code>fedgap.experiment.diagnostics</code>).</p>
<h2>Partition</h2>
<p>{_e(p['clients'])} clients; samples per client {_e(p['samples_min'])} / {p['samples_median']:.0f} /
{_e(p['samples_max'])} (min / median / max); labels per client {p['classes_per_client_mean']:.2f} on average;
mean total-variation distance to the global label mix {p['mean_tv_distance']:.3f}.</p>
{heat_img}
<h2>Reproduce</h2><pre>{_e(res.command)}</pre>
{cut}{'<ul>' + skipped + '</ul>' if skipped else ''}
<details><summary>Runs in this folder</summary><ul>{runs}</ul></details>
</main></body></html>
"""


def write_report(res, path: Path) -> Path:
    outputs.atomic_write_text(path, render(res))
    return path
