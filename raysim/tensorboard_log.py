"""A run's per-round numbers as TensorBoard scalars, written with tensorboard's own event-file writer.

What ``torch.utils.tensorboard.SummaryWriter(log_dir, purge_step=...).add_scalar`` writes, without
importing torch into the driver (1 s, against 0.2 s for these tensorboard modules).
"""

from __future__ import annotations

import os


class TensorBoardLog:
    def __init__(self, log_dir: str | os.PathLike, purge_step: int):
        """Events from ``purge_step`` on in earlier files of ``log_dir`` are dropped by TensorBoard
        (a resumed run redoes those rounds), as SummaryWriter's ``purge_step`` marks them."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        self._writer = EventFileWriter(str(log_dir))
        self._writer.add_event(Event(step=purge_step, file_version="brain.Event:2"))
        self._writer.add_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def add_scalars(self, step: int, values: dict[str, float], wall_time: float) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._writer.add_event(self._event(summary=summary, step=step, wall_time=wall_time))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
