"""``mmkd report``: an HTML page with plots of one run's stages and evaluations, or several runs side by side."""

from mmkd.report.page import write_report
from mmkd.report.run import EvalData, RunData, RunFiles, Series, StageData, read_metrics_csv, read_run

__all__ = ["EvalData", "RunData", "RunFiles", "Series", "StageData", "read_metrics_csv", "read_run", "write_report"]
