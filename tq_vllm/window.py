"""Which positions of a sequence are exact and which are compressed: the flush buffer's rule.

Everything here is a pure function of (key position j, query position p), never of how the
sequence reached the engine (prompt vs generated tokens, chunk boundaries, prefix-cache hits,
preemption), so every way of computing a request gives the same attention:

    F = max(flush_interval, 1), S = sink_tokens, ring_start(p) = max(F * (p // F), S)
    key j is exact for query p   iff  j < S  or  ring_start(p) <= j <= p
    key j is compressed          iff  S <= j < ring_start(p)

That is the seed's flush buffer with flush points at multiples of F: the newest 1..F tokens of the
query's own group of F positions are exact, and "the buffer fills" when p crosses a multiple of F.
(The seed flushed relative to the end of the prompt; here the prompt is compressed the same way
as generated tokens, so prompt log-probs show the real cost of the format.)

Storage in vLLM: every token is written compressed to the paged cache when it is computed, so the
pages are always complete and can be shared by prefix caching.  Exact copies live in a raw pool
with one row per running request: slots 0..S-1 hold the sinks, slots S.. hold the current group
(position j at slot S + j - ring_start(j)).  A request resumed after preemption or starting from
a prefix-cache hit recomputes from a hit length that is a multiple of F (vLLM's hits are whole
blocks; the backend requires block_size % F == 0 with prefix caching, and no sinks), so its group
is rebuilt from tokens it computes itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Window:
    """flush_interval F (0 behaves as 1: only the token itself is exact) and sink count S."""

    flush_interval: int
    sink_tokens: int

    @property
    def group(self) -> int:
        return max(self.flush_interval, 1)

    @property
    def row_slots(self) -> int:
        """R: raw pool slots per request (sinks, then one group)."""
        return self.sink_tokens + self.group

    # -- scalar (host) forms ------------------------------------------------------------------
    def ring_start(self, p: int) -> int:
        return max(self.group * (p // self.group), self.sink_tokens)

    def raw_len(self, p: int) -> int:
        """Exact tokens seen by the query at position p (sinks + its group up to p)."""
        return min(self.sink_tokens, p + 1) + max(0, p - self.ring_start(p) + 1)

    def slot(self, j: int) -> int:
        return j if j < self.sink_tokens else self.sink_tokens + j - self.ring_start(j)

    # -- tensor (device) forms, used to fill persistent metadata buffers ----------------------
    def ring_start_t(self, p: Tensor) -> Tensor:
        return torch.clamp((p // self.group) * self.group, min=self.sink_tokens)

    def raw_len_t(self, p: Tensor) -> Tensor:
        sinks = torch.clamp(p + 1, max=self.sink_tokens)
        return sinks + torch.clamp(p - self.ring_start_t(p) + 1, min=0)

    def slot_t(self, j: Tensor) -> Tensor:
        return torch.where(j < self.sink_tokens, j, self.sink_tokens + j - self.ring_start_t(j))


@dataclass(frozen=True)
class Segment:
    """Queries of one request that share one exact/compressed split: positions [start, end),
    tokens [tok_start, tok_start + end - start) of the batch.

    For every query in it: compressed page positions S .. prefix_len-1; exact pool tokens
    0 .. pool_len-1 of the request's row (sinks before `start`, and the group's tokens before
    `start` that earlier steps computed); exact chunk tokens start .. p."""

    req: int
    tok_start: int
    start: int
    end: int
    prefix_len: int
    pool_len: int


def segments(window: Window, req: int, tok_start: int, first: int, end: int) -> list[Segment]:
    """Split the chunk of positions [first, end) of batch request `req` (its tokens start at
    `tok_start`) at multiples of F.  Positions before `first` were computed by earlier steps."""
    out = []
    a = first
    s_cnt = window.sink_tokens
    while a < end:
        e = min(end, (a // window.group + 1) * window.group)
        rs = window.ring_start(a)
        pool = min(s_cnt, a) + (a - rs if a > rs else 0)
        out.append(Segment(req, tok_start + a - first, a, e, rs, pool))
        a = e
    return out
