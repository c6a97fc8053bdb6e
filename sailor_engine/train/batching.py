"""Packing token sequences into one varlen micro-batch for the packed forward and the fused loss.

A sequence of L tokens contributes L - 1 positions: inputs ids[:-1] predict targets ids[1:], and
each position carries the loss mask and sampling log-prob of its *target* token. Sequences are
laid back to back (no padding) and delimited by cu_seqlens, so attention never crosses them.

    mb = pack([Sequence(ids, mask, logps), ...])
    hidden = model.forward_packed(mb.input_ids, mb.cu_seqlens)            # (N, H)
    logp = fused_linear_logprob(hidden, model.output_weight, mb.loss_targets)  # (N,): 0 off the loss rows

Splitting a batch into micro-batches under a token budget: `split_by_tokens` keeps the batch order
(greedy next-fit); `ffd_split` packs first-fit-decreasing (numba), typically fewer, fuller
micro-batches, for callers to whom order does not matter (a globally normalised loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import numba
import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100  # fused_linear_logprob's default ignore_index


@dataclass(frozen=True)
class Sequence:
    token_ids: list[int]
    loss_mask: list[int]  # 1: the token was produced by the policy (trained on)
    logprobs: list[float] | None = None  # sampling log-probs (RL); None for supervised data


@dataclass(frozen=True)
class PackedBatch:
    input_ids: Tensor  # (N,) int64
    targets: Tensor  # (N,) int64
    loss_mask: Tensor  # (N,) float32, of the target token
    old_logp: Tensor | None  # (N,) float32 sampling log-probs of the targets, when every sequence has them
    cu_seqlens: Tensor  # (S + 1,) int64
    seq_ids: Tensor  # (N,) int64 in [0, S)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def loss_targets(self) -> Tensor:
        """targets, with IGNORE_INDEX where the loss mask is 0: fused_linear_logprob gives those rows
        log-prob 0 without computing them (in agent trajectories most rows are prompt and tool
        responses), and they carry no loss or gradient anyway."""
        return self.targets.masked_fill(self.loss_mask == 0, IGNORE_INDEX)

    def to(self, device: torch.device | str) -> "PackedBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def pack(seqs: Seq[Sequence]) -> PackedBatch:
    """Pack sequences (each >= 2 tokens) into one micro-batch; see the module docstring."""
    for i, s in enumerate(seqs):
        if len(s.token_ids) < 2:
            raise ValueError(f"sequence {i}: needs at least 2 tokens to predict one, got {len(s.token_ids)}")
        if len(s.loss_mask) != len(s.token_ids) or (s.logprobs is not None and len(s.logprobs) != len(s.token_ids)):
            raise ValueError(f"sequence {i}: token_ids, loss_mask and logprobs must have one length")
    if not seqs:
        raise ValueError("pack: no sequences")
    inputs = [t for s in seqs for t in s.token_ids[:-1]]
    targets = [t for s in seqs for t in s.token_ids[1:]]
    mask = [m for s in seqs for m in s.loss_mask[1:]]
    lens = torch.tensor([len(s.token_ids) - 1 for s in seqs])
    old = None
    if all(s.logprobs is not None for s in seqs):
        old = torch.tensor([lp for s in seqs for lp in s.logprobs[1:]], dtype=torch.float32)
    return PackedBatch(
        input_ids=torch.tensor(inputs), targets=torch.tensor(targets),
        loss_mask=torch.tensor(mask, dtype=torch.float32), old_logp=old,
        cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]),
        seq_ids=torch.repeat_interleave(torch.arange(len(seqs)), lens),
    )


def split_by_tokens(seqs: Seq[Sequence], budget: int) -> list[list[Sequence]]:
    """Greedy in-order split into micro-batches of at most `budget` packed positions each.

    A sequence longer than the budget gets a micro-batch of its own (never cut: a sequence must lie
    in one micro-batch for per-sequence normalisation).
    """
    out: list[list[Sequence]] = [[]]
    used = 0
    for s in seqs:
        n = len(s.token_ids) - 1
        if out[-1] and used + n > budget:
            out.append([])
            used = 0
        out[-1].append(s)
        used += n
    return [mb for mb in out if mb]


@numba.njit(cache=True)
def _ffd(lengths: np.ndarray, order: np.ndarray, capacity: int) -> np.ndarray:
    free = np.empty(len(lengths), np.int64)  # remaining room of each open bin
    bins = np.empty(len(lengths), np.int64)
    n = 0
    for i in order:
        b = 0
        while b < n and free[b] < lengths[i]:
            b += 1
        if b == n:  # an item longer than the capacity opens a bin no later item fits (free < 0)
            free[n] = capacity
            n += 1
        free[b] -= lengths[i]
        bins[i] = b
    return bins


def ffd_bins(lengths: Seq[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: item indices per bin, bins in opening order, indices ascending in a bin.

    Longest first (ties by index), each into the first open bin with room, so at most
    11/9 OPT + 6/9 bins. An item longer than `capacity` gets a bin of its own.
    """
    if capacity < 1:
        raise ValueError(f"ffd_bins: capacity must be >= 1, got {capacity}")
    if not len(lengths):
        return []
    arr = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(arr)), -arr))  # by -length, then index: deterministic
    bins = _ffd(arr, order, capacity)
    out: list[list[int]] = [[] for _ in range(int(bins.max()) + 1)]
    for i, b in enumerate(bins.tolist()):
        out[b].append(i)
    return out


def ffd_split(seqs: Seq[Sequence], budget: int) -> list[list[Sequence]]:
    """Micro-batches of at most `budget` packed positions, packed first-fit-decreasing."""
    return [[seqs[i] for i in b] for b in ffd_bins([len(s.token_ids) - 1 for s in seqs], budget)]
