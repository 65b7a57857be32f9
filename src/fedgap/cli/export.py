"""``fedgap export``: write a fedgap experiment in another framework's format (registered on the CLI group)."""

from __future__ import annotations

from pathlib import Path

import click

from fedgap.export.flower_files import DEFAULT_SUPERLINK

EPILOG = ("CONFIG is an optional YAML file; OVERRIDES are dotted key=value pairs applied after it. "
          "`fedgap keys` lists every key.")


@click.group()
def export() -> None:
    """Export an experiment to run elsewhere.

    \b
    fedgap export flower CONFIG --out DIR   a Flower app (flwr 1.42) running the same experiment
    fedgap export keras RUN_DIR --out FILE  a run's trained Keras model as a .keras file
    """


@export.command(epilog=EPILOG)
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [OVERRIDES]...")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the Flower app.")
@click.option("--name", default=None, help="Project name in the app's pyproject.toml (default: from --out).")
@click.option("--superlink", default=DEFAULT_SUPERLINK, show_default=True, metavar="HOST:PORT",
              help="The SuperLink's address, for the connection in superlink.toml.")
@click.option("--root-certificates", type=click.Path(path_type=Path), default=None, metavar="CA.pem",
              help="The CA certificate that signed the SuperLink's TLS certificate (default: no TLS).")
@click.option("--overwrite", is_flag=True,
              help="Write into a folder that is not an earlier export, replacing files named like the app's.")
def flower(args, out, name, superlink, root_certificates, overwrite):
    """Write a Flower app (message API, flwr 1.42) that trains the same model with the same client objective,
    server optimizer and norm policy as `fedgap run CONFIG`.

    The app (pyproject.toml, fedgap_app/client_app.py, fedgap_app/server_app.py) calls fedgap's own client
    update and aggregation; config.yaml and partition.npz (client id -> training rows) go beside it, and
    superlink.toml, the SuperLink connection for `flwr run`. Each SuperNode is one fedgap client (node config
    partition-id). --out must be new, empty or an earlier export left as it was written (else --overwrite).
    Run it with `pip install 'fedgap[flower]'`; see docs/flower.md.
    """
    from fedgap.cli.console import err_console, load
    from fedgap.export.flower import export_flower
    from fedgap.preflight import check_inputs

    cfg = load(args)
    check_inputs(cfg)  # the data set loads and the model builds, before --out is touched
    export_flower(cfg, out, name=name, superlink=superlink, root_certificates=root_certificates, overwrite=overwrite)
    err_console.print(f"Flower app written to {out}: {cfg.data.num_clients} SuperNodes (partition-id 0.."
                      f"{cfg.data.num_clients - 1}), {cfg.server.rounds} rounds; see {out / 'README.md'}",
                      highlight=False, soft_wrap=True)


@export.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .keras file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def keras(run_dir, out, overwrite):
    """Write the trained global model of the run in RUN_DIR (a `fedgap run --out` folder whose model.name is a
    Keras factory) as a .keras file that keras.models.load_model opens under any backend: the checkpoint's
    model, or its running average under server.average, with its final softmax back on. Its inputs are
    standardized as in the run (printed); see docs/keras.md.
    """
    from fedgap.cli.console import err_console
    from fedgap.export.keras import export_keras

    done = export_keras(run_dir, out, overwrite=overwrite)
    fmt = lambda values: ", ".join(f"{v:.4f}" for v in values)  # noqa: E731
    what = "the running average of the round models" if done.averaged else "the global model"
    err_console.print(f"Keras model written to {done.path}: {what} after {done.rounds} rounds; inputs are "
                      f"standardized per channel as in the run: (x - mean) / std with mean ({fmt(done.mean)}) and "
                      f"std ({fmt(done.std)}), 8-bit images first scaled to [0, 1]", highlight=False, soft_wrap=True)
