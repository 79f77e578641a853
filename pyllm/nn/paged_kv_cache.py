"""A paged KV cache (:class:`PagedKVCache`): the keys and values of a batch of
sequences of different lengths in fixed-size pages drawn from one pool, read
by :func:`pyllm.attention_paged` and written by :func:`pyllm.paged_kv_append`
(vLLM's and FlashInfer's layout): no padding, and a sequence takes only the
pages its tokens fill.
"""

from __future__ import annotations

import torch

import pyllm

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """Keys and values of ``batch`` sequences in pages of ``page_size`` tokens.

    ``k_pages``/``v_pages``: ``(num_pages, page_size, heads_kv, head_dim)``,
    the pool; ``block_table``: ``(batch, max_pages_per_sequence)`` int32, the
    pages of each sequence in order; ``seqlens``: ``(batch,)`` int32 tokens
    held per sequence (``lengths`` the same as a Python list). Pages are taken
    from the pool as sequences grow (:meth:`append`) and given back by
    :meth:`release`; a sequence never holds more than ``ceil(max_tokens /
    page_size)`` pages.

    Args:
        batch: sequences.
        max_tokens: the most tokens one sequence may hold.
        heads_kv, head_dim: of the keys and values.
        page_size: tokens per page (multiples of 16 read fastest).
        num_pages: the pool's size (default: enough for every sequence at
            ``max_tokens``).
        dtype, device: of the pages.
    """

    def __init__(self, batch: int, max_tokens: int, heads_kv: int, head_dim: int, *,
                 page_size: int = 16, num_pages: int | None = None, dtype=None, device=None):
        if page_size < 1 or max_tokens < 0 or batch < 0:
            raise ValueError(f"pyllm.nn.PagedKVCache: page_size must be >= 1 and batch, "
                             f"max_tokens >= 0, got page_size={page_size}, batch={batch}, "
                             f"max_tokens={max_tokens}")
        per_sequence = max(1, -(-max_tokens // page_size))
        num_pages = batch * per_sequence if num_pages is None else num_pages
        shape = (num_pages, page_size, heads_kv, head_dim)
        self.k_pages = torch.empty(shape, dtype=dtype, device=device)
        self.v_pages = torch.empty(shape, dtype=dtype, device=device)
        self.page_size, self.max_tokens = page_size, max_tokens
        self.block_table = torch.zeros((batch, per_sequence), dtype=torch.int32, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.lengths = [0] * batch
        self._pages: list[list[int]] = [[] for _ in range(batch)]
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: 0, 1, ...

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def _reserve(self, counts: list[int]) -> None:
        """Pages for ``counts[s]`` more tokens of each sequence s."""
        needed = []
        for s, n in enumerate(counts):
            total = self.lengths[s] + n
            if n < 0 or total > self.max_tokens:
                raise ValueError(f"pyllm.nn.PagedKVCache: sequence {s} would hold {total} tokens, "
                                 f"more than max_tokens = {self.max_tokens}" if n >= 0 else
                                 f"pyllm.nn.PagedKVCache: counts must be >= 0, got {n}")
            needed.append(max(0, -(-total // self.page_size) - len(self._pages[s])))
        if sum(needed) > len(self._free):
            raise RuntimeError(f"pyllm.nn.PagedKVCache: out of pages (all "
                               f"{self.k_pages.shape[0]} in use or needed: {sum(needed)} more "
                               f"wanted, {len(self._free)} free); release finished sequences or "
                               f"allocate more")
        for s, n in enumerate(needed):
            self._pages[s].extend(self._free.pop() for _ in range(n))
        if any(needed):
            rows = [p + [0] * (self.block_table.shape[1] - len(p)) for p in self._pages]
            self.block_table.copy_(torch.tensor(rows, dtype=torch.int32))

    def token_positions(self, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, position) ``(sum(counts),)`` int64 of ``counts[s]`` new
        tokens of each sequence s, packed by sequence, following its held tokens."""
        device = self.seqlens.device
        sequence = torch.repeat_interleave(torch.arange(self.batch, device=device),
                                           torch.tensor(counts, device=device))
        first = torch.tensor([0] + counts[:-1], device=device).cumsum(0) if counts else \
            torch.zeros(0, dtype=torch.int64, device=device)
        start = torch.tensor(self.lengths, device=device, dtype=torch.int64)
        within = torch.arange(sequence.numel(), device=device) - first[sequence]
        return sequence, start[sequence] + within

    def append(self, k: torch.Tensor, v: torch.Tensor, counts: list[int], *,
               q: torch.Tensor | None = None, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               interleaved: bool = False) -> None:
        """Appends ``counts[s]`` tokens to each sequence s.

        Args:
            k, v: ``(sum(counts), heads_kv, head_dim)``, packed by sequence.
            counts: new tokens per sequence (0: none).
            q, cos, sin, positions, interleaved: the rotary embedding of the
                new keys (on the way into the pages) and of q (in place), as
                :func:`pyllm.paged_kv_append`; positions default to each
                token's position in its sequence.
        """
        if len(counts) != self.batch:
            raise ValueError(f"pyllm.nn.PagedKVCache: counts must have one entry per sequence "
                             f"({self.batch}), got {len(counts)}")
        self._reserve(counts)
        sequence, position = self.token_positions(counts)
        slots = pyllm.paged_slots(self.block_table, self.page_size, sequence, position)
        rotary = {}
        if cos is not None:
            rotary = dict(q=q, cos=cos, sin=sin, interleaved=interleaved,
                          positions=position if positions is None else positions)
        pyllm.paged_kv_append(self.k_pages, self.v_pages, k, v, slots, **rotary)
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]
        self.seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32))

    def step_counts(self, x_shape, cu_seqlens: torch.Tensor | None, where: str) -> list[int]:
        """New tokens per sequence of a step whose input has leading shape
        ``x_shape`` ``(batch, seq)``: seq each, or from ``cu_seqlens`` ``(batch +
        1,)`` when the input is packed ``(1, tokens)``; ``where`` names the
        caller in errors."""
        b, s = x_shape[0], x_shape[1]
        if cu_seqlens is not None:
            if b != 1:
                raise ValueError(f"{where}: with cu_seqlens, the input must be packed (1, "
                                 f"tokens, ...), got leading shape {tuple(x_shape)}")
            bounds = cu_seqlens.tolist()
            counts = [e - a for a, e in zip(bounds[:-1], bounds[1:])]
            if not bounds or bounds[0] != 0 or bounds[-1] != s or min(counts, default=0) < 0:
                raise ValueError(f"{where}: cu_seqlens must rise from 0 to the {s} tokens of "
                                 f"the input, got {bounds}")
        else:
            counts = [s] * b
        if len(counts) != self.batch:
            raise ValueError(f"{where}: the cache holds {self.batch} sequences, the call gives "
                             f"{len(counts)}")
        return counts

    def attention(self, q: torch.Tensor, counts: list[int], **kwargs) -> torch.Tensor:
        """:func:`pyllm.attention_paged` of ``q`` ``(sum(counts), heads,
        head_dim)``, the queries of the tokens just appended (``counts[s]`` of
        sequence s, packed), over every sequence's held tokens; ``kwargs``:
        causal, window_size, softcap, alibi_slopes, sinks."""
        cu_q = torch.zeros(len(counts) + 1, dtype=torch.int32, device=q.device)
        if counts:
            torch.cumsum(torch.tensor(counts, device=q.device), 0, out=cu_q[1:])
        return pyllm.attention_paged(q, self.k_pages, self.v_pages, self.block_table,
                                     self.seqlens, cu_seqlens_q=cu_q,
                                     max_seqlen_q=max(counts, default=0),
                                     max_seqlen_k=max(self.lengths, default=0), **kwargs)

    def release(self, sequence: int) -> None:
        """Empties ``sequence`` and gives its pages back to the pool."""
        self._free.extend(reversed(self._pages[sequence]))
        self._pages[sequence] = []
        self.lengths[sequence] = 0
        self.seqlens[sequence] = 0

    def reset(self) -> None:
        """Empties every sequence."""
        for s in range(self.batch):
            self.release(s)
