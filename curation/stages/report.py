"""report: writes ``stats/report.html`` (see :mod:`curation.report`, which ``lvd report RUN`` runs too)."""

from __future__ import annotations

from curation.stages.base import Stage, Unit


class ReportStage(Stage):
    name = "report"

    def plan(self) -> list[Unit]:
        return [Unit("report")]

    def is_done(self, unit: Unit) -> bool:
        return (self.root / "stats" / "report.html").exists()

    def run_unit(self, unit: Unit) -> dict:
        from curation.report import build_report

        build_report(self.root, self.cfg)
        return {"pages": 1}
