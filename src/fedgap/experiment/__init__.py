"""One experiment end to end: the round loop over an engine, its files (config, metrics, summary,
checkpoint) and the diagnostics measured along the way. Above the FL math (``fedgap.fl``) and the engines;
below the run executor (``fedgap.runs``), the doctor and the CLI."""
