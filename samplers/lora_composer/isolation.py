"""Concept isolation in self-attention, pure torch (DESIGN.md §4 "LoRA-Composer").

A query inside one or more concept boxes may attend only to keys whose boxes are all among its own, and to
the background; a query outside every box attends everywhere. So a query in box A never takes anything from
box B (the official rule), and where boxes overlap a query may still look at both (the official code leaves
such queries the background alone, and NaN when there is none).

Nothing dense is built: every position gets a *membership code* (a bit per box, one ``[N]`` integer vector
per attention resolution, shared by heads and batch rows), positions with equal codes form a group, and each
group's queries attend to the keys allowed to that code in one call of ComfyUI's attention over the gathered
keys — exactly a masked softmax with blocked weights 0, at no more cost than the unmasked attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def membership_codes(members: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64 bit codes from ``members [R, N]`` (boolean: position n is in box r); at most 62 boxes."""
    if members.shape[0] > 62:
        raise ValueError(f"{members.shape[0]} boxes: isolation supports at most 62")
    bits = (1 << torch.arange(members.shape[0], dtype=torch.int64, device=members.device))[:, None]
    return (members.bool().to(torch.int64) * bits).sum(dim=0)


def allowed_keys(codes: torch.Tensor, query_codes: torch.Tensor | None = None) -> torch.Tensor:
    """``[Nq, N]`` boolean: may a query (code ``query_codes``, default ``codes``) attend to each key."""
    qc = (codes if query_codes is None else query_codes)[:, None]
    return (qc == 0) | ((codes[None, :] & ~qc) == 0)


def isolated_attention(q, k, v, heads: int, codes: torch.Tensor, attention: Attention,
                       query_codes: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Self-attention ``[B, Nq, C]`` with isolation by the keys' ``codes [N]``, each group of queries in one
    ``attention`` call. ``query_codes [Nq]``: the queries' codes when they are not all N positions in order."""
    qcodes = codes if query_codes is None else query_codes
    if not bool((qcodes != 0).any()):
        return attention(q, k, v, heads)
    out = None
    for code in torch.unique(qcodes).tolist():
        queries = torch.nonzero(qcodes == code).flatten()
        keys = None if code == 0 else torch.nonzero((codes & ~code) == 0).flatten()
        if keys is not None and keys.numel() == codes.numel():
            keys = None
        part = attention(
            q.index_select(1, queries),
            k if keys is None else k.index_select(1, keys),
            v if keys is None else v.index_select(1, keys),
            heads,
        )
        if out is None:
            out = part.new_zeros(q.shape[0], q.shape[1], part.shape[-1])
        out = out.index_copy(1, queries, part) if part.requires_grad else out.index_copy_(1, queries, part)
    return out


def isolated_probabilities(q, k, heads: int, codes: torch.Tensor | None, queries: torch.Tensor | None = None,
                           selected: bool = False):  # fmt: skip
    """Head-averaged self-attention probabilities ``[B, Nq, N]`` with blocked keys at exactly 0, for the
    region loss (small layers only: this one is dense). ``queries`` selects query positions (default all);
    ``selected``: ``q`` holds only those positions' queries already."""
    b, n, inner = k.shape
    d = inner // heads
    if queries is not None and not selected:
        q = q.index_select(1, queries)
    qh = q.reshape(b, q.shape[1], heads, d).transpose(1, 2).float()
    kh = k.reshape(b, n, heads, d).transpose(1, 2).float()
    scores = qh @ kh.transpose(-1, -2) * d**-0.5  # [B, h, Nq, N]
    if codes is not None:
        qc = codes if queries is None else codes.index_select(0, queries)
        scores = scores.masked_fill(~allowed_keys(codes, qc)[None, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)


def masked_attention_reference(q, k, v, heads: int, allowed: torch.Tensor) -> torch.Tensor:
    """Dense masked softmax attention (for tests): ``allowed [N, N]`` boolean."""
    b, n, inner = q.shape
    d = inner // heads

    def split(t):
        return t.reshape(b, t.shape[1], heads, d).transpose(1, 2).float()

    scores = split(q) @ split(k).transpose(-1, -2) * d**-0.5
    probs = torch.softmax(scores.masked_fill(~allowed[None, None], float("-inf")), dim=-1)
    return (probs @ split(v)).transpose(1, 2).reshape(b, n, inner)
