"""Balanced packing with a cardinality cap, batched over rows (layers, or layer x node).

Every pack (node or GPU) must receive exactly n // num_packs items, because each GPU
holds the same number of expert slots. The aim is the smallest heaviest pack.
"""

from __future__ import annotations

import torch
from torch import Tensor


def balanced_packing(weight: Tensor, num_packs: int, refine: bool = True) -> tuple[Tensor, Tensor]:
    """Pack the n items of each row into num_packs packs of n // num_packs items each.

    weight: [rows, n] with n a multiple of num_packs. Returns (pack [rows, n], rank in
    pack [rows, n]), both int64; (pack, rank) pairs are distinct within a row.

    Greedy longest-processing-time first: heaviest item first, into the lightest pack
    that still has room. Then, with refine, pairwise swaps out of the heaviest pack
    (see `_swap_refine`). The loops run over items and swaps; each step handles all
    rows at once.
    """
    rows, n = weight.shape
    if num_packs <= 0 or n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} packs of equal size")
    per_pack = n // num_packs
    ident = torch.arange(n, dtype=torch.int64).expand(rows, -1)
    if per_pack == 1:  # one item per pack: nothing to choose
        return ident.clone(), torch.zeros(rows, n, dtype=torch.int64)
    if num_packs == 1:
        return torch.zeros(rows, n, dtype=torch.int64), ident.clone()
    weight = weight.to(torch.float64).contiguous()
    order = weight.sort(dim=1, descending=True, stable=True).indices
    sorted_w = weight.gather(1, order).t().contiguous()
    # key = pack load, +inf once the pack is full, so argmin only sees open packs.
    key = torch.zeros(rows * num_packs, dtype=torch.float64)
    count = torch.zeros(rows * num_packs, dtype=torch.int64)
    offset = torch.arange(rows, dtype=torch.int64) * num_packs
    one = torch.ones(rows, dtype=torch.int64)
    pack_sorted = torch.empty(n, rows, dtype=torch.int64)
    rank_sorted = torch.empty(n, rows, dtype=torch.int64)
    for i in range(n):
        pack = key.view(rows, num_packs).argmin(1)
        flat = pack + offset
        rank = count.index_select(0, flat)
        pack_sorted[i] = pack
        rank_sorted[i] = rank
        count.index_add_(0, flat, one)
        full = torch.where(rank == per_pack - 1, torch.inf, 0.0)
        key.index_add_(0, flat, sorted_w[i] + full)
    pack_idx = torch.empty(rows, n, dtype=torch.int64).scatter_(1, order, pack_sorted.t())
    rank_idx = torch.empty(rows, n, dtype=torch.int64).scatter_(1, order, rank_sorted.t())
    if refine:
        _swap_refine(weight, pack_idx, rank_idx, num_packs, max_steps=2 * num_packs)
    return pack_idx, rank_idx


def _swap_refine(weight: Tensor, pack: Tensor, rank: Tensor, num_packs: int, max_steps: int) -> None:
    """Improve a packing in place by swapping items out of each row's heaviest pack.

    Each step takes the heaviest pack h of every row still improving, and among all
    swaps of an item a in h with an item b elsewhere (pack o) picks the one with the
    smallest max(new load of h, new load of o); it is applied if that is below h's
    load. Pack sizes never change, and the sorted vector of pack loads only
    decreases, so this ends; max_steps bounds the work. LPT leaves a few per cent on
    the table when packs hold few items of uneven size; this recovers most of it.
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    members = torch.empty(rows, n, dtype=torch.int64)
    members.scatter_(1, pack * per_pack + rank, torch.arange(n, dtype=torch.int64).expand(rows, -1))
    # Flat views: index_select / index_copy_ cost far less per call than tensor[rows, cols].
    members = members.view(rows * num_packs, per_pack)
    members_flat, pack_flat, rank_flat = members.view(-1), pack.view(-1), rank.view(-1)
    loads = torch.zeros(rows, num_packs, dtype=torch.float64).scatter_add_(1, pack, weight)
    loads_flat, weight_flat = loads.view(-1), weight.view(-1)
    live = torch.arange(rows)
    for _ in range(max_steps):
        w = weight.index_select(0, live)
        lpack = pack.index_select(0, live)
        lloads = loads.index_select(0, live)
        top, heavy = lloads.max(1)
        heavy_row = live * num_packs + heavy
        out = members.index_select(0, heavy_row)  # [live, per_pack] items of the heavy pack
        w_out = w.gather(1, out)
        # Swapping a (heavy pack, load top) with b (pack of load lo) moves d = w_a - w_b:
        # max(top - d, lo + d) = mid_b + |w_a - w_b - half_b|, mid = (top+lo)/2,
        # half = (top-lo)/2. Items of the heavy pack itself get top + |d| >= top, so
        # they never pass the test below and need no mask.
        lo = lloads.gather(1, lpack)
        half = (top.unsqueeze(1) - lo) * 0.5
        cost = w_out.unsqueeze(2) - (w + half).unsqueeze(1)
        cost.abs_().add_((lo + half).unsqueeze(1))
        best_cost, best = cost.flatten(1).min(1)
        # Relative margin: float noise must not count as progress.
        ok = best_cost < top * (1 - 1e-9)
        if not bool(ok.any()):
            return
        sel = ok.nonzero().squeeze(1)
        live, heavy_row, best = live.index_select(0, sel), heavy_row.index_select(0, sel), best.index_select(0, sel)
        i, b = best // n, best % n
        a = out.index_select(0, sel).gather(1, i.unsqueeze(1)).squeeze(1)
        at_a, at_b = live * n + a, live * n + b
        other_row = live * num_packs + pack_flat.index_select(0, at_b)
        rb = rank_flat.index_select(0, at_b)
        moved = weight_flat.index_select(0, at_a) - weight_flat.index_select(0, at_b)
        loads_flat.index_add_(0, heavy_row, -moved)
        loads_flat.index_add_(0, other_row, moved)
        members_flat.index_copy_(0, heavy_row * per_pack + i, b)
        members_flat.index_copy_(0, other_row * per_pack + rb, a)
        pack_flat.index_copy_(0, at_a, other_row - live * num_packs)
        rank_flat.index_copy_(0, at_a, rb)
        pack_flat.index_copy_(0, at_b, heavy_row - live * num_packs)
        rank_flat.index_copy_(0, at_b, i)
