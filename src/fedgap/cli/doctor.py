"""``fedgap doctor``: parse, call, write the report, print."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
from rich import box
from rich.table import Table

from fedgap.cli.console import err_console, out_console, split_config_args

EPILOG = ("CONFIG is an optional YAML file; OVERRIDES are dotted key=value pairs applied after it. "
          "`fedgap keys` lists every key.")


def _command(name: str, args, **flags) -> str:
    parts = ["fedgap", name, *args]
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        parts += [f"--{flag}"] if value is True else [f"--{flag}", str(value)]
    return shlex.join(parts)


def _remedies_help() -> str:
    from fedgap.diagnose.variants import PRESETS, REMEDIES

    quick = set(PRESETS["quick"].remedies)
    return "Remedies (* = in the quick preset): " + ", ".join(
        f"{r.label}{'*' if r.key in quick else ''}" for r in REMEDIES) + ". " + EPILOG


def _presets_help() -> str:
    from fedgap.diagnose.variants import PRESETS

    q, f = PRESETS["quick"], PRESETS["full"]
    return (f"quick: {q.rounds} rounds, {len(q.remedies)} remedies, the best paired with each other cause's at "
            f"its own tuned values (6-8 minutes on 2 cores); full: {f.rounds} rounds, all {len(f.remedies)} "
            f"remedies also over the client lr, up to {f.combine_steps} added and tuned again on top (hours).")


@click.command(epilog=_remedies_help())
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [OVERRIDES]...")
@click.option("--preset", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help=_presets_help())
@click.option("--seeds", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Seeds per variant (mean and standard deviation in the table).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/doctor"), show_default=True,
              help="Folder for report.html, gap.csv, summary.json and the cached runs.")
@click.option("--jobs", type=click.IntRange(1, 64), default=None,
              help="Runs at once (default: one per core; 1 for the parallel and ray engines).")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="Intra-op threads of each run (default: cores // jobs). A run's float32 numbers depend on it: "
                   "resume and repeat a doctor with the same value.")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Accuracy for 'rounds to target' (default: the naive run's final accuracy).")
@click.option("--remedies", default=None, metavar="KEY,KEY",
              help="Only these remedies (keys as in gap.csv, e.g. fedbn,logit_adjust); default: the preset's.")
@click.option("--overwrite", is_flag=True,
              help="Write into an --out that holds other files (a run's, yours): the doctor's files replace files of "
                   "the same name, the rest is kept. Without it such a folder is refused.")
@click.option("--cluster", default=None, metavar="local|auto|HOST:PORT",
              help="Run the doctor's runs on a Ray cluster, one Ray task each, with the same results as here (same "
                   "--threads): local = a private Ray on this machine running --jobs runs at once; auto = the "
                   "cluster `ray start` began here; HOST:PORT = that cluster's head. The run cache stays in --out "
                   "(docs/ray.md).")
@click.option("--gpus-per-run", type=click.FloatRange(0, min_open=True), default=None, metavar="F",
              help="With --cluster: each run trains on cuda with this share of a GPU (0.25: four runs share one).")
@click.option("--quiet", is_flag=True, help="No progress display.")
def doctor(args, preset, seeds, out, jobs, threads, target, remedies, overwrite, cluster, gpus_per_run, quiet):
    """Measure the federated-centralized gap of your setting, explain it, and find the configuration that
    closes it.

    Runs the centralized baseline and the naive federated run (your setting as given), tunes every remedy on
    a validation split (data.validation) by successive halving, searches the combination by greedy forward
    selection and writes the winner as OUT/recommended.yaml, plus report.html, gap.csv and summary.json.
    Nothing is chosen on test accuracy. Runs are cached in OUT/runs by config hash: an interrupted doctor
    resumes, a repeated one reuses them.
    """
    from fedgap.diagnose.doctor import run_doctor
    from fedgap.errors import FedgapError
    from fedgap.report import write_doctor_report

    if gpus_per_run is not None and cluster is None:
        raise FedgapError("--gpus-per-run: a GPU share per run is asked of a Ray cluster; give --cluster too")
    path, overrides = split_config_args(args)
    command = _command("doctor", args, preset=preset, seeds=seeds if seeds != 1 else None, out=out,
                       target=target, remedies=remedies, threads=threads)
    res = run_doctor(path, overrides, preset=preset, seeds=seeds, out=out, jobs=jobs, target=target,
                     show_progress=not quiet, command=command,
                     remedies=tuple(remedies.split(",")) if remedies else None, render=write_doctor_report,
                     threads=threads, overwrite=overwrite, cluster=cluster, gpus_per_run=gpus_per_run or 0.0)
    out_console.print(gap_table(res))
    for f in res.findings:
        if f.kind in ("cause", "remedy"):
            out_console.print(f"[bold]{f.title}[/bold]: {f.text}", highlight=False, soft_wrap=True)
    if res.recommended is not None:
        out_console.print(f"[bold]Recommended[/bold] ({res.recommended.label}): {out / 'recommended.yaml'}, run it "
                          f"with `fedgap run {out / 'recommended.yaml'}`", highlight=False, soft_wrap=True)
    err_console.print(f"report: {out / 'report.html'}  table: {out / 'gap.csv'}; {res.timing()}",
                      highlight=False, soft_wrap=True)


def gap_table(res) -> Table:
    from fedgap.diagnose.gap import fmt_pct, status
    from fedgap.runs.scores import LATE_EVALS

    table = Table(title=f"fedgap doctor ({res.preset.name}): gap to centralized training, ranked",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("variant", min_width=14)
    for col in ("val", "test acc", "gap pp", "gap*", "closed", "rounds"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, r in enumerate(res.rows, 1):
        style = {"naive": "red", "central": "bold"}.get(r.variant)
        if res.recommended is not None and r.variant == res.recommended.key:
            style = "bold green"
        reach = "-" if r.variant == "central" else (
            f"{r.rounds_to_target:.0f}" if r.rounds_to_target is not None else "never")
        table.add_row(
            str(i), r.label + status(r), fmt_pct(r.final_val_accuracy), fmt_pct(r.final_test_accuracy, r.final_std),
            "-" if r.gap_pp is None else f"{r.gap_pp:.2f}",
            "-" if r.gap_equal_samples_pp is None else f"{r.gap_equal_samples_pp:.2f}",
            "-" if r.gap_closed is None else f"{100 * r.gap_closed:.0f}%", reach, style=style)
    table.caption = (f"ranked by val: validation accuracy (what selects); test acc: mean of the last {LATE_EVALS} "
                     f"evaluations; gap pp: to "
                     f"centralized final accuracy; gap*: to centralized after as many samples; "
                     f"rounds: to reach {fmt_pct(res.target)} ({res.target_source})")
    table.caption_justify = "left"
    return table


__all__ = ["doctor", "gap_table"]
