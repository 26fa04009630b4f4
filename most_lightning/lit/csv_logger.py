"""Lightning's CSVLogger, with a writer that keeps the columns already in metrics.csv.

Lightning's writer knows only the columns it has seen itself. Under ddp_spawn, fit and test each run in fresh
worker copies of the logger, so the test's writer starts from no columns, finds metrics.csv from the fit and
rewrites it with the test's columns only, which fails ("dict contains fields not in fieldnames"). This writer
reads the existing header first, so the file grows the union of the columns.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.csv_logs import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _KeepColumnsWriter(ExperimentWriter):
    def _record_new_keys(self) -> set[str]:
        if not self.metrics_keys and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys.extend(next(csv.reader(file), []))
        return super()._record_new_keys()


class CSVLogger(_CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepColumnsWriter(log_dir=self.log_dir)
        return self._experiment
