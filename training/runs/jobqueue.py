"""The (fold, seed) jobs of a fold-parallel run, dealt from one shared queue.

A folder with one file per job; a worker claims the next job by renaming its file into
``claimed-<worker>-<job>`` (``os.rename`` is atomic on one filesystem: two workers never
get one job) and removes the claim when the member is written. So two GPUs finish
five folds x two seeds as 5 + 5 members, not 6 + 4; a worker that dies leaves its claim
behind, which names exactly the job it did not finish (nothing is retrained in its place).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

Job = Tuple[int, int]
_JOB = re.compile(r"^(\d{4})-fold(-?\d+)_seed(-?\d+)$")
_CLAIM = re.compile(r"^claimed-(\d+)-(\d{4})-fold(-?\d+)_seed(-?\d+)$")


@dataclass(frozen=True)
class JobQueue:
    folder: str

    def fill(self, jobs: Sequence[Job]) -> None:
        """A fresh queue holding ``jobs`` in this order (any earlier queue is dropped)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder)
        for i, (fold, seed) in enumerate(jobs):
            open(os.path.join(self.folder, f"{i:04d}-fold{fold}_seed{seed}"), "w").close()

    def _entries(self) -> List[str]:
        return sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []

    def claim(self, worker: int) -> Optional[Job]:
        """The next unclaimed job for ``worker``, or None when the queue is empty."""
        for name in self._entries():
            m = _JOB.match(name)
            if not m:
                continue
            try:
                os.rename(os.path.join(self.folder, name), os.path.join(self.folder, f"claimed-{worker}-{name}"))
            except FileNotFoundError:  # another worker was faster
                continue
            return int(m.group(2)), int(m.group(3))
        return None

    def jobs(self, worker: int) -> Iterator[Job]:
        """Claim jobs until none is left."""
        while True:
            job = self.claim(worker)
            if job is None:
                return
            yield job

    def done(self, worker: int, job: Job) -> None:
        for name in self._entries():
            m = _CLAIM.match(name)
            if m and int(m.group(1)) == worker and (int(m.group(3)), int(m.group(4))) == job:
                os.unlink(os.path.join(self.folder, name))

    def claimed(self) -> List[Tuple[int, Job]]:
        """(worker, job) of every claim not marked done: jobs a worker started and did not finish."""
        out = []
        for name in self._entries():
            m = _CLAIM.match(name)
            if m:
                out.append((int(m.group(1)), (int(m.group(3)), int(m.group(4)))))
        return out

    def unclaimed(self) -> List[Job]:
        return [(int(m.group(2)), int(m.group(3))) for m in map(_JOB.match, self._entries()) if m]
