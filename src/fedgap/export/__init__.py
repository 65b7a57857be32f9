"""Exports of a fedgap experiment to other runtimes. ``fedgap export flower CONFIG --out DIR`` writes a Flower
app (``fedgap.export.flower``) whose ClientApp and ServerApp run fedgap's own client update and aggregation
(``fedgap.export.flower_app``), so the exported app is the same experiment as ``fedgap run CONFIG``."""
