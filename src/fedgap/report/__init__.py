"""Plots and the documents a person reads: the doctor's report.html and gap.md (above ``fedgap.diagnose``,
whose results they render; the doctor itself writes only data files)."""

from __future__ import annotations


def write_doctor_report(res) -> None:
    """Render ``report.html`` and ``gap.md`` of a doctor result into its folder."""
    from fedgap.experiment import outputs
    from fedgap.report.html import write_report
    from fedgap.report.markdown import render_markdown

    outputs.atomic_write_text(res.out / "gap.md", render_markdown(res))
    write_report(res, res.out / "report.html")
