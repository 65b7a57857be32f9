"""What every command shares: the two consoles, the config-argument convention, the help epilog."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

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
