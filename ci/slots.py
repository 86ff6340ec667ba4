"""The runner's slots: which build attempt runs in which slot, so a slot is
given to one attempt at a time, one build never runs twice at once, and a
cancel or a stale lease reaches the right execution."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .execution import Execution


@dataclass
class Active:
    execution: Execution
    task: asyncio.Task


class Slots:
    def __init__(self, count: int):
        self.count = count
        self.active: dict[int, Active] = {}     # by slot

    def free(self) -> int | None:
        """The first free slot, or None when all are taken."""
        return next((slot for slot in range(self.count) if slot not in self.active), None)

    def runs_build(self, build: int) -> bool:
        return any(a.execution.request.build == build for a in self.active.values())

    def find(self, build: int, attempt: int | None = None) -> list[Execution]:
        """The executions of ``build`` (of that ``attempt`` only, unless None)."""
        return [a.execution for a in self.active.values() if a.execution.request.build == build
                and attempt in (None, a.execution.request.attempt)]

    def take(self, slot: int, execution: Execution, task: asyncio.Task) -> None:
        self.active[slot] = Active(execution, task)

    def release(self, slot: int, execution: Execution) -> None:
        """Free ``slot`` if ``execution`` still holds it."""
        if self.active.get(slot) is not None and self.active[slot].execution is execution:
            del self.active[slot]

    def stop_all(self, reason: str, grace: float) -> list[asyncio.Task]:
        """Stop every execution; returns their tasks, to wait for."""
        for active in self.active.values():
            active.execution.stop(reason, grace=grace)
        return [a.task for a in self.active.values()]
