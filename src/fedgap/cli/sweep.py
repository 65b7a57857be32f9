"""``fedgap sweep``: parse, run the grid (``fedgap.runs.sweep``), print the table, draw the curves."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from fedgap.cli.console import err_console, out_console, split_config_args
from fedgap.diagnose.gap import fmt_pct
from fedgap.runs.scores import LATE_EVALS


@click.command(epilog="Values separated by commas make a grid axis; a single value is a plain override.")
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [KEY=V1,V2 ...]...")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/sweep"), show_default=True,
              help="Folder for sweep.csv, sweep.png, summary.json and the cached runs.")
@click.option("--jobs", type=click.IntRange(1, 64), default=None, help="Runs at once (default: one per core).")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="Intra-op threads of each run (default: cores // jobs); a run's numbers depend on it.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def sweep(args, out, jobs, threads, quiet):
    """Run a grid of experiments (cached and resumable like the doctor) and compare them."""
    from fedgap.report.plots import save, sweep_figure
    from fedgap.runs.sweep import ranked_by_validation, run_sweep

    def plot(folder: Path, runs) -> None:
        curves = [(spec.name, [(r["round"], r["test_accuracy"]) for r in rec.rows
                               if r.get("test_accuracy") is not None]) for spec, rec in runs]
        save(sweep_figure(curves), folder / "sweep.png")

    path, overrides = split_config_args(args)
    keys, rows, runs = run_sweep(path, overrides, out, jobs=jobs, threads=threads, show_progress=not quiet,
                                 command=" ".join(["fedgap", "sweep", *args]), render=plot)
    has_val = ranked_by_validation(rows)
    table = Table(title=f"fedgap sweep: {len(rows)} runs" + (", ranked by validation" if has_val else ""),
                  title_justify="left")
    for k in keys:
        table.add_column(k)
    val_col = (f"val last-{LATE_EVALS}",) if has_val else ()
    for col in (*val_col, "final acc", f"last-{LATE_EVALS} mean", "best acc", "rounds to target", "s/round"):
        table.add_column(col, justify="right")
    for r in rows:
        val_cell = (fmt_pct(r["late_val_accuracy"]),) if has_val else ()
        table.add_row(*[str(r[k]) for k in keys], *val_cell, fmt_pct(r["final_test_accuracy"]),
                      fmt_pct(r["late_test_accuracy"]),
                      fmt_pct(r["best_test_accuracy"]),
                      "not reached" if r["rounds_to_target"] is None else str(r["rounds_to_target"]),
                      "-" if r["seconds_per_round"] is None else f"{r['seconds_per_round']:.2f}",
                      style="red" if r["error"] else None)
    out_console.print(table)
    err_console.print(f"table: {out / 'sweep.csv'}  plot: {out / 'sweep.png'}", highlight=False)
