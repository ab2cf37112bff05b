"""Host-side assignment of raw-pool rows to requests (model runner V1, whose batch rows move).

A request keeps its row while the model runner knows it (running, or waiting to be scheduled
again); rows of finished requests are freed.  Preempted requests stay known to the runner, so
when every row is taken the least recently used row of a request outside the current batch is
reclaimed.  A request that then needs exact tokens from earlier steps which are no longer in its
row gets a clear error instead of a silently different result.
"""
from __future__ import annotations

from tq_vllm.window import Window


class RawRows:
    def __init__(self, num_rows: int, window: Window):
        self.num_rows = num_rows
        self.window = window
        self.owner: dict[int, str] = {}   # row -> request id
        self.row_of: dict[str, int] = {}  # request id -> row
        self.written: dict[str, int] = {}  # request id -> end of the positions its row received
        self.last_use: dict[int, int] = {}
        self.step = 0

    def _needs_prior(self, first: int) -> bool:
        """Whether the step starting at position `first` reads exact tokens of earlier steps."""
        w = self.window
        return first > w.ring_start(first) or (w.sink_tokens > 0 and first > 0)

    def _holds(self, written: int, first: int) -> bool:
        """Whether a row filled up to position `written` (exclusive) holds the sinks and the group
        tokens that a step starting at `first` reads."""
        if first == written:
            return True
        w = self.window
        return first < written and w.ring_start(first) == w.ring_start(written - 1)

    def _free(self, rid: str) -> None:
        row = self.row_of.pop(rid)
        del self.owner[row]
        self.written.pop(rid, None)

    def assign(self, req_ids: list[str | None], live: set[str], first_pos: list[int],
               seq_lens: list[int]) -> list[int]:
        """Rows for the batch's requests (None: padding -> the scratch row `num_rows`)."""
        self.step += 1
        for rid in [r for r in self.row_of if r not in live]:
            self._free(rid)
        in_batch = {r for r in req_ids if r is not None}
        rows = []
        for rid, first, end in zip(req_ids, first_pos, seq_lens):
            if rid is None:
                rows.append(self.num_rows)
                continue
            row = self.row_of.get(rid)
            if row is None:
                row = self._take(in_batch)
                self.owner[row] = rid
                self.row_of[rid] = row
                self.written[rid] = 0
            if self._needs_prior(first) and not self._holds(self.written[rid], first):
                raise RuntimeError(
                    f"tq_vllm: request {rid} continues at position {first}, inside a flush group "
                    f"(TQ_FLUSH_INTERVAL={self.window.flush_interval}), but the exact tokens of "
                    f"that group are not in its raw-pool row (a prefix-cache hit not ending at a "
                    f"flush point, or its row was reclaimed while it waited). Raise "
                    f"max_num_seqs or make block_size a multiple of TQ_FLUSH_INTERVAL.")
            self.written[rid] = end
            self.last_use[row] = self.step
            rows.append(row)
        return rows

    def _take(self, in_batch: set[str]) -> int:
        free = [r for r in range(self.num_rows) if r not in self.owner]
        if free:
            return free[0]
        idle = [r for r, rid in self.owner.items() if rid not in in_batch]
        if not idle:
            raise RuntimeError("tq_vllm: more requests in one batch than raw-pool rows "
                               "(max_num_seqs)")
        row = min(idle, key=lambda r: self.last_use.get(r, 0))
        self._free(self.owner[row])
        return row
