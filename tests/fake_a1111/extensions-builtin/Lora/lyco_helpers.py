"""Stand-in of the built-in Lora's lyco_helpers.py (v1.10.1, same maths): conventional up @ down (with the dyn_dim
slice), CP (Tucker) rebuilds for LoRA (`lora_mid`) and LoHa/LoKr (`*_t1`/`*_t2`), and LyCORIS' `factorization`."""

from __future__ import annotations

import torch


def make_weight_cp(t, wa, wb):  # type: ignore[no-untyped-def]
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def rebuild_conventional(up, down, shape, dyn_dim=None):  # type: ignore[no-untyped-def]
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    if dyn_dim is not None:
        up = up[:, :dyn_dim]
        down = down[:dyn_dim, :]
    return (up @ down).reshape(shape)


def rebuild_cp_decomposition(up, down, mid):  # type: ignore[no-untyped-def]
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    return torch.einsum("n m k l, i n, m j -> i j k l", mid, up, down)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n == dimension, m <= n, m the divisor closest to `factor` (-1: as square as possible)."""
    if factor > 0 and (dimension % factor) == 0:
        m = factor
        n = dimension // factor
        if m > n:
            n, m = m, n
        return m, n
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n
