"""Whether a step's gradient norm is finite, read on the host without draining the device's queue.

``first_step`` queues the norm, then a copy of it into pinned host memory and an event; the kernels
do nothing on a non-finite norm, decided on the device. The host reads the copy when it needs the
decision: at once on a mask-update step (a mask is never built from a non-finite gradient), else at
the end of the step (``second_step``, ``restore``, before ``step(closure)``'s second pass). Waiting on
the event waits for the norm only, not for the work queued after it, and the host copy is read as
memory (no torch op): a plain step makes no blocking read of a device value.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


class NormCheck:
    """The host copy of the last recorded norm (one pinned buffer per dtype and one event, reused)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, tuple[torch.Tensor, object]] = {}  # (device, dtype) -> (host tensor, numpy view)
        self._events: dict[torch.device, torch.cuda.Event] = {}
        self._view = None
        self._event: Optional[torch.cuda.Event] = None
        self.unread = False  # recorded, decision not yet taken
        self.quiet = False  # a skip is routine (a GradScaler's overflow): no warning
        self.last = float("nan")  # the value last read

    def __getstate__(self) -> dict:
        return {"_buffers": {}, "_events": {}, "_view": None, "_event": None, "unread": False, "quiet": False,
                "last": float("nan")}

    def record(self, norm: torch.Tensor, quiet: bool = False) -> None:
        """Queue the copy of ``norm`` (a 0-dim tensor) to the host."""
        norm = norm.detach()
        key = (norm.device, norm.dtype)
        if key not in self._buffers:
            host = torch.empty((), dtype=norm.dtype, pin_memory=norm.device.type == "cuda")
            self._buffers[key] = (host, host.numpy())
        host, self._view = self._buffers[key]
        self._event = None
        if norm.device.type == "cuda":
            host.copy_(norm.reshape(()), non_blocking=True)
            event = self._events.get(norm.device)
            if event is None:
                event = self._events[norm.device] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(norm.device))
            self._event = event
        else:  # the CPU (no queue), or a device without pinned copies: a plain copy
            host.copy_(norm.reshape(()))
        self.unread, self.quiet = True, quiet

    def value(self) -> float:
        """The recorded norm (waits for its copy, not for the work queued after it)."""
        if self._event is not None:
            self._event.synchronize()
        self.unread = False
        self.last = float(self._view)
        return self.last

    def finite(self) -> bool:
        return math.isfinite(self.value())
