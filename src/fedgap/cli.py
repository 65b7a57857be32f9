"""fedgap's command line: parse, call, print. No experiment logic lives here.

Every command takes ``--help``. A mistake the user can fix exits with code 2 and one line on stderr naming the
key or file; an interrupted run says how to resume it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fedgap import __version__
from fedgap.errors import FedgapError

out_console = Console()
err_console = Console(stderr=True)

CONFIG_HELP = (
    "CONFIG is an optional YAML file; OVERRIDES are dotted key=value pairs applied after it, e.g. "
    "data.partition=dirichlet data.alpha=0.1 server.algorithm=fedprox. `fedgap keys` lists every key."
)


def split_config_args(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the config file; the rest are overrides."""
    path, overrides = None, []
    for arg in args:
        if "=" not in arg and path is None and not overrides:
            path = arg
        elif "=" not in arg:
            raise FedgapError(f"argument '{arg}': expected key=value (only the first argument may be a config file)")
        else:
            overrides.append(arg)
    return path, overrides


def load(args: tuple[str, ...], base: Path | None = None):
    from fedgap.config import load_config

    path, overrides = split_config_args(args)
    if path is None and base is not None and base.exists():
        path = str(base)
    return load_config(path, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="fedgap")
def cli() -> None:
    """fedgap: why does my CNN lose accuracy under federated learning, and what fixes it?

    \b
    fedgap doctor      measure the federated-centralized gap and rank the remedies (the main job)
    fedgap run         one experiment (federated, or centralized with data.partition=central)
    fedgap sweep       a grid of experiments
    fedgap partition   statistics and a heatmap of a client partition
    fedgap keys        every config key with its default
    fedgap export      write an experiment as a Flower app
    """


@cli.command(epilog=CONFIG_HELP)
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [OVERRIDES]...")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: runs/<config hash>).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (its config.yaml is reused).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(args, out, resume, overwrite, quiet):
    """Run one experiment and write config.yaml, metrics.csv, summary.json and a checkpoint to --out."""
    from fedgap.config import results_hash
    from fedgap.fl.loop import Experiment

    if resume and out is None:
        raise FedgapError("--resume: needs --out DIR (the folder of the run to continue)")
    cfg = load(args, base=(out / "config.yaml") if (resume and out is not None) else None)
    out = out or Path("runs") / f"run-{results_hash(cfg)}"
    exp = Experiment(cfg, out, resume=resume, overwrite=overwrite, show_progress=not quiet)
    summary = exp.run()
    print_run_summary(cfg, summary, out)


def print_run_summary(cfg, summary: dict, out: Path) -> None:
    table = Table(title=f"fedgap run: {cfg.server.algorithm} on {cfg.data.name} ({cfg.data.partition})",
                  show_header=False, title_justify="left")
    fmt = lambda v, pct=False: "-" if v is None else (f"{v:.2%}" if pct else f"{v:,.2f}")  # noqa: E731
    table.add_row("final test accuracy", fmt(summary["final_test_accuracy"], True))
    table.add_row("best test accuracy", fmt(summary["best_test_accuracy"], True))
    if "final_personal_accuracy" in summary:
        table.add_row("personalized accuracy (FedBN)", fmt(summary["final_personal_accuracy"], True))
    table.add_row("rounds", str(summary["rounds_completed"]))
    target = summary["target_accuracy"]
    table.add_row(f"rounds to {target:.0%}", str(summary["rounds_to_target"] or "not reached"))
    table.add_row("seconds per round", fmt(summary["seconds_per_round"]))
    table.add_row("training samples / s", fmt(summary["train_samples_per_second"]))
    table.add_row("output", str(out))
    out_console.print(table)
    if summary.get("diverged_at_round"):
        err_console.print(f"[yellow]warning:[/] training diverged: the global model held non-finite weights after "
                          f"round {summary['diverged_at_round']}, so the run stopped there; try a lower client.lr "
                          f"(now {cfg.client.lr}) or server.lr (now {cfg.server.lr})")


@cli.command(epilog=CONFIG_HELP)
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [OVERRIDES]...")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Save a client x label heatmap (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def partition(args, plot, as_json):
    """Show how data.partition splits the training set: sizes, labels per client, heterogeneity."""
    import json

    from fedgap.data.datasets import load_dataset
    from fedgap.data.partition import partition_for, partition_stats

    cfg = load(args)
    d = cfg.data
    data = load_dataset(d.name, d.root)
    labels = data.train_y.numpy()
    parts = partition_for(d, labels, cfg.seed)
    stats = partition_stats(parts, labels, data.num_classes)
    summary = stats.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        table = Table(title=f"{d.partition} partition of {d.name} over {len(parts)} clients (seed {cfg.seed})",
                      show_header=False, title_justify="left")
        table.add_row("samples per client (min / median / max)",
                      f"{summary['samples_min']} / {summary['samples_median']:.0f} / {summary['samples_max']}")
        table.add_row("labels per client (min / mean / max)",
                      f"{summary['classes_per_client_min']} / {summary['classes_per_client_mean']:.2f} / "
                      f"{summary['classes_per_client_max']}")
        table.add_row("mean total-variation distance to the global label mix",
                      f"{summary['mean_tv_distance']:.3f}  (0 = IID, 1 = disjoint)")
        out_console.print(table)
    if plot is not None:
        from fedgap.report.plots import partition_heatmap

        partition_heatmap(stats.counts, plot, title=f"{d.partition} (alpha={d.alpha})" if d.partition in
                          ("dirichlet", "quantity") else d.partition)
        err_console.print(f"heatmap written to {plot}")


@cli.command()
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [OVERRIDES]...")
@click.option("--resolved", is_flag=True, help="Print the resolved config of CONFIG and OVERRIDES as YAML instead.")
@click.option("--markdown", is_flag=True, help="Print the key reference as a markdown table (docs/config.md).")
def keys(args, resolved, markdown):
    """List every config key with its default and meaning (or print a resolved config)."""
    from fedgap.config import describe_keys, dump_yaml, keys_markdown

    if resolved:
        click.echo(dump_yaml(load(args)), nl=False)
        return
    if markdown:
        click.echo(keys_markdown(), nl=False)
        return
    table = Table("key", "default", "meaning", title="fedgap config keys", title_justify="left")
    for key, default, text in describe_keys():
        table.add_row(key, default, text)
    out_console.print(table)


def _register_optional_commands() -> None:
    """Commands living in their own modules (doctor, sweep) register themselves on the group."""
    import importlib

    for module in ("fedgap.diagnose.commands", "fedgap.export.commands"):
        try:
            importlib.import_module(module).register(cli)
        except ModuleNotFoundError as exc:
            # Only a missing command module (or its package) is optional; any other import error is a bug.
            if exc.name is None or not module.startswith(exc.name):
                raise


def main(argv: list[str] | None = None) -> None:
    _register_optional_commands()
    try:
        cli.main(args=argv, prog_name="fedgap", standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("fedgap: aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FedgapError as exc:
        err_console.print(f"fedgap: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("fedgap: interrupted; a run continues from its last checkpoint with "
                          "`fedgap run --out DIR --resume`", soft_wrap=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
