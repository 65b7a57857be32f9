"""fedgap's command line: parse, call, print. No experiment logic lives here.

Every command takes ``--help``. A mistake the user can fix exits with code 2 and one line on stderr naming the
key or file; an interrupted run says how to resume it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from fedgap import __version__
from fedgap.cli.console import CONFIG_HELP, err_console, load, out_console, split_config_args
from fedgap.errors import FedgapError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="fedgap")
def cli() -> None:
    """fedgap: why does my CNN lose accuracy under federated learning, and what fixes it?

    \b
    fedgap doctor      measure the federated-centralized gap and rank the remedies (the main job)
    fedgap run         one experiment (federated, or centralized with data.partition=central)
    fedgap sweep       a grid of experiments
    fedgap partition   statistics and a heatmap of a client partition
    fedgap model-info  the model built for a config: norm layers replaced, parameters, MACs per image
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
    from fedgap.experiment.loop import Experiment
    from fedgap.preflight import probe_user_model

    if resume and out is None:
        raise FedgapError("--resume: needs --out DIR (the folder of the run to continue)")
    cfg = load(args, base=(out / "config.yaml") if (resume and out is not None) else None)
    probe_user_model(cfg)  # a model file that ends the interpreter at import: one line, before anything runs
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
    from fedgap.data.partition import partition_for, partition_stats, partition_text
    from fedgap.files import check_file

    cfg = load(args)
    if plot is not None:
        check_file(plot, "--plot")  # before the work: a folder or an unwritable place there is one line
    d = cfg.data
    data = load_dataset(d.name, d.root, d.path)
    labels = data.train_y.numpy()
    parts = partition_for(d, labels, cfg.seed)
    stats = partition_stats(parts, labels, data.num_classes)
    summary = stats.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        table = Table(title=f"{partition_text(d)} partition of {d.name} over {len(parts)} clients (seed {cfg.seed})",
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

        partition_heatmap(stats.counts, plot, title=partition_text(d))
        err_console.print(f"heatmap written to {plot}")


@cli.command("model-info", epilog=CONFIG_HELP)
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [OVERRIDES]...")
def model_info(args):
    """Build the config's model for its data set and show what was found and replaced (model.norm on your own
    model's BatchNorm layers), each BatchNorm layer's momentum and eps, its parameters, its multiply-accumulates
    per image and whether the vectorized engine can batch it."""
    from fedgap.engines.cohort_model import CohortModel
    from fedgap.errors import ConfigError
    from fedgap.models.info import model_info as describe_model
    from fedgap.preflight import check_inputs

    cfg = load(args)
    data, model, replaced = check_inputs(cfg)
    info = describe_model(model, replaced, data.image_shape)
    c, h, w = data.image_shape
    table = Table("layer", "was", "now", title=f"norm layers (model.norm={cfg.model.norm})", title_justify="left")
    for row in info.norm_rows:
        table.add_row(row.layer, row.was, row.now)
    if not info.norm_rows:
        table.add_row("-", "no norm layers", "-")
    out_console.print(table)
    if info.batchnorm_rows:
        bn_table = Table("layer", "momentum", "eps", "running variance", title_justify="left",
                         title="BatchNorm layers (momentum: weight of the new batch statistics, torch's convention)")
        for row in info.batchnorm_rows:
            bn_table.add_row(row.layer, "cumulative" if row.momentum is None else f"{row.momentum:.6g}",
                             f"{row.eps:.6g}", row.variance)
        out_console.print(bn_table)
    try:
        CohortModel(model)
        vectorized = "can batch this model"
    except ConfigError as exc:
        vectorized = str(exc).removeprefix("engine.name: ")
    summary = Table(show_header=False, title_justify="left")
    summary.add_row("model", cfg.model.name)
    summary.add_row("input", f"{c} x {h} x {w} ({cfg.data.name}), {data.num_classes} classes")
    summary.add_row("norm layers replaced", str(len(replaced)))
    summary.add_row("parameters", f"{info.parameters:,}")
    summary.add_row("MACs per image (conv + linear)", f"{info.macs_per_image:,}")
    summary.add_row("engine.name=vectorized", vectorized)
    for note in info.notes:
        summary.add_row("note", note)
    out_console.print(summary)


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


def _register_commands() -> None:
    """Commands living in their own modules (doctor, sweep, export)."""
    from fedgap.cli.doctor import doctor
    from fedgap.cli.export import export
    from fedgap.cli.sweep import sweep

    cli.add_command(doctor)
    cli.add_command(sweep)
    cli.add_command(export)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
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


__all__ = ["CONFIG_HELP", "cli", "err_console", "load", "main", "out_console", "split_config_args"]
