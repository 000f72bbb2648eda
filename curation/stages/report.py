"""report: writes ``stats/report.html`` (see :mod:`curation.report`, which ``lvd report RUN`` runs too)."""

from __future__ import annotations

from curation.stages.base import Stage, Unit


class ReportStage(Stage):
    name = "report"
    section = "report"
    order = 90

    def plan(self) -> list[Unit]:
        return [Unit("report")]

    def run_unit(self, unit: Unit) -> dict:
        from curation.report import write_report

        write_report(self.layout, self.image_sets["anchors"], self.settings, self.seed, self.image_sets["eval"])
        return {"pages": 1}
