"""``track.tensorboard=DIR``: TensorBoard event files in ``DIR/<run folder name>``.

Scalars per round (step = round): every numeric metrics-row column (test accuracy and loss, train loss,
seconds, samples, and with ``eval.diagnostics=true`` every diagnostics column); the resolved config as
hparams (HParams tab) and as text. A resumed run opens its writer with ``purge_step`` = the checkpoint's round,
so events the killed process wrote from that round on are dropped when TensorBoard reads the folder and each
step is shown once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedgap.config import dump_yaml
from fedgap.files import check_folder
from fedgap.track import require
from fedgap.track.base import Tracker, flat_config


class TensorBoardTracker(Tracker):
    def __init__(self, cfg, out: Path | None, label: str):
        super().__init__(cfg, out, label)
        require("tensorboard", "tensorboard", "track.tensorboard")  # fail before the run starts
        self.log_dir = Path(cfg.track.tensorboard) / (out.name if out is not None else label)
        check_folder(self.log_dir, "track.tensorboard")  # a file in the way fails here, before any round
        self.writer = None

    def start(self, experiment, resumed: bool) -> bool:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        fresh = not (self.log_dir.exists() and any(self.log_dir.iterdir()))
        self.writer = SummaryWriter(str(self.log_dir), purge_step=self.start_round if resumed else None)
        if fresh or not resumed:
            params = flat_config(self.cfg)
            for summary in hparams(params, {"test_accuracy": 0.0, "test_loss": 0.0}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```yaml\n" + dump_yaml(self.cfg) + "```", 0)
        return fresh

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, experiment, summary: dict[str, Any] | None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
