"""``fedgap doctor`` and ``fedgap sweep``: parse, call, print (registered on the CLI group by fedgap.cli)."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
from rich import box
from rich.table import Table

from fedgap.errors import FedgapError

EPILOG = ("CONFIG is an optional YAML file; OVERRIDES are dotted key=value pairs applied after it. "
          "`fedgap keys` lists every key.")


def _command(name: str, args, **flags) -> str:
    parts = ["fedgap", name, *args]
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        parts += [f"--{flag}"] if value is True else [f"--{flag}", str(value)]
    return shlex.join(parts)


@click.command(epilog=EPILOG)
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [OVERRIDES]...")
@click.option("--preset", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="quick: about 10 minutes on 2 cores, some variants and rounds cut; full: everything to convergence.")
@click.option("--seeds", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Seeds per variant (mean and standard deviation in the table).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/doctor"), show_default=True,
              help="Folder for report.html, gap.csv, summary.json and the cached runs.")
@click.option("--jobs", type=click.IntRange(1, 64), default=None,
              help="Runs at once (default: one per core; 1 for the parallel and ray engines).")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Accuracy for 'rounds to target' (default: the naive run's final accuracy).")
@click.option("--quiet", is_flag=True, help="No progress display.")
def doctor(args, preset, seeds, out, jobs, target, quiet):
    """Measure the federated-centralized gap of your setting, explain it and rank the remedies.

    Runs the centralized baseline, the naive federated run (your setting as given) and each remedy changed
    one at a time (GroupNorm, LayerNorm, FedBN, BN recalibration, FedProx, SCAFFOLD, FedAvgM, FedAdam,
    FedYogi, AdamW, augmentation), then the best combination; writes report.html, gap.csv and summary.json.
    Runs are cached in OUT/runs by config hash: an interrupted doctor resumes, a repeated one reuses them.
    """
    from fedgap.cli import err_console, out_console, split_config_args
    from fedgap.diagnose.doctor import run_doctor

    path, overrides = split_config_args(args)
    command = _command("doctor", args, preset=preset, seeds=seeds if seeds != 1 else None, out=out,
                       target=target)
    res = run_doctor(path, overrides, preset=preset, seeds=seeds, out=out, jobs=jobs, target=target,
                     show_progress=not quiet, command=command)
    out_console.print(gap_table(res))
    for f in res.findings:
        if f.kind in ("cause", "remedy"):
            out_console.print(f"[bold]{f.title}[/bold]: {f.text}", highlight=False, soft_wrap=True)
    err_console.print(f"report: {out / 'report.html'}  table: {out / 'gap.csv'}; {res.timing()}",
                      highlight=False, soft_wrap=True)


def gap_table(res) -> Table:
    from fedgap.diagnose.gap import LATE_EVALS, fmt_pct, status

    table = Table(title=f"fedgap doctor ({res.preset.name}): gap to centralized training, ranked",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("variant", min_width=14)
    for col in ("final acc", "last", "gap pp", "gap*", "closed", "rounds"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, r in enumerate(res.rows, 1):
        style = {"naive": "red", "central": "bold", "combined": "green"}.get(r.variant)
        reach = "-" if r.variant == "central" else (
            f"{r.rounds_to_target:.0f}" if r.rounds_to_target is not None else "never")
        table.add_row(
            str(i), r.label + status(r), fmt_pct(r.final_test_accuracy, r.final_std), fmt_pct(r.last_test_accuracy),
            "-" if r.gap_pp is None else f"{r.gap_pp:.2f}",
            "-" if r.gap_equal_samples_pp is None else f"{r.gap_equal_samples_pp:.2f}",
            "-" if r.gap_closed is None else f"{100 * r.gap_closed:.0f}%", reach, style=style)
    table.caption = (f"final acc: mean of the last {LATE_EVALS} evaluations; last: the last one; gap pp: to "
                     f"centralized final accuracy; gap*: to centralized after as many samples; "
                     f"rounds: to reach {fmt_pct(res.target)} ({res.target_source})")
    table.caption_justify = "left"
    return table


def register(cli: click.Group) -> None:
    from fedgap.diagnose.sweep import sweep

    cli.add_command(doctor)
    cli.add_command(sweep)


__all__ = ["FedgapError", "doctor", "register"]
