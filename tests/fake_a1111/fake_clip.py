"""Fake-only deterministic text encoder: words are tokens, every word has a fixed random vector (seeded by a
hash of the word and the encoder's width). Chunking and padding follow A1111: 75 tokens per chunk plus BOS/EOS
(77 rows per chunk, chunks stacked), prompts of one batch padded to the longest by repeating their last row."""

from __future__ import annotations

import math
import zlib

import torch

TOKENS_PER_CHUNK = 75
CHUNK_LEN = 77


def tokenize(prompt: str) -> list[str]:
    return prompt.split()


def chunk_count(prompt: str) -> int:
    """k = ceil(max(tokens, 1) / 75)."""
    return max(1, math.ceil(len(tokenize(prompt)) / TOKENS_PER_CHUNK))


def _vec(word: str, dim: int, salt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{salt}|{dim}|{word}".encode()))
    return torch.randn(dim, generator=g)


def encode_one(prompt: str, dim: int, salt: str = "clip") -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (77k, dim), pooled (dim,)) for one prompt."""
    words = tokenize(prompt)
    k = chunk_count(prompt)
    bos, eos = _vec("<|startoftext|>", dim, salt), _vec("<|endoftext|>", dim, salt)
    rows = []
    for c in range(k):
        chunk = words[c * TOKENS_PER_CHUNK:(c + 1) * TOKENS_PER_CHUNK]
        toks = [_vec(w, dim, salt) for w in chunk] + [eos] * (TOKENS_PER_CHUNK - len(chunk))
        pos = torch.arange(CHUNK_LEN, dtype=torch.float32)[:, None] / CHUNK_LEN
        rows.append(torch.stack([bos, *toks, eos]) + 0.1 * torch.sin(pos * torch.arange(1, dim + 1) / dim))
    z = torch.cat(rows, 0)
    pooled = torch.stack([_vec(w, dim, salt + "-pool") for w in words]).mean(0) if words else eos.clone()
    return z, pooled


def encode(prompts: list[str], dim: int, salt: str = "clip") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 77k, dim) padded to the longest prompt by repeating each prompt's last row; pooled (B, dim)."""
    encoded = [encode_one(p, dim, salt) for p in prompts]
    n = max(z.shape[0] for z, _ in encoded)
    zs = [torch.cat([z, z[-1:].expand(n - z.shape[0], -1)]) if z.shape[0] < n else z for z, _ in encoded]
    return torch.stack(zs), torch.stack([p for _, p in encoded])
