"""Per-seed noise: `ImageRNG(shape, seeds)`; the first `next()` seeds one CPU generator per image, later calls
continue those generators (A1111's order for hires noise and ancestral samplers)."""

from __future__ import annotations

import torch

from modules import devices


class ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0,  # type: ignore[no-untyped-def]
                 seed_resize_from_w=0):
        self.shape = tuple(map(int, shape))
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.generators = [torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFF) for seed in seeds]
        self.is_first = True

    def first(self):  # type: ignore[no-untyped-def]
        return self.next()

    def next(self):  # type: ignore[no-untyped-def]
        self.is_first = False
        xs = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(xs).to(devices.device)
