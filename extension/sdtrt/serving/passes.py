"""The UNet calls a generation will make, worked out before it runs: its sampling passes (first pass, hires pass,
refiner switch) with their sizes and checkpoints, and per pass the shapes of its UNet calls as A1111 1.10 batches
them (cond and uncond together or apart, padded or not). Pure functions over plain values: the WebUI side
(`webui/coverage.py`) reads the request and the host, then asks the serving code which engine takes each call.

Mirrors, and must follow when they change:
- A1111 `StableDiffusionProcessingTxt2Img.calculate_target_resolution` and the hires pass's truncation (the
  latent of an explicit hires size is cropped to that size when the aspect ratio differs);
- A1111 `CFGDenoiser.forward`: how cond/uncond rows are split into UNet calls (`batch_cond_uncond`,
  `pad_cond_uncond`, `pad_cond_uncond_v0`, skipped uncond);
- the refiner switch (`refiner_checkpoint`, `refiner_switch_at`): the same pass continues on another model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdtrt.constants import LATENT_FACTOR


@dataclass(frozen=True)
class CallShape:
    """One kind of UNet call: `rows` latents (images x conditionings) of `height` x `width` pixels with
    `chunks` prompt chunks of context."""

    rows: int
    height: int
    width: int
    chunks: int


@dataclass(frozen=True)
class CfgOptions:
    """A1111's options that decide how the CFG denoiser batches cond and uncond."""

    batch_cond_uncond: bool = True
    pad_cond_uncond: bool = False
    pad_cond_uncond_v0: bool = False
    #: uncond skipped on some steps (NGMS `s_min_uncond` > 0 or `skip_early_cond` > 0): calls of cond rows only
    may_skip_uncond: bool = False


@dataclass(frozen=True)
class PassSpec:
    """One sampling pass of a generation. `checkpoint` names the model that runs it (None: the loaded one)."""

    name: str
    width: int
    height: int
    batch: int
    cond_chunks: int
    uncond_chunks: int
    conds_per_image: int = 1
    checkpoint: str | None = None
    calls: tuple[CallShape, ...] = field(default=())

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def cfg_calls(batch: int, height: int, width: int, cond_chunks: int, uncond_chunks: int,
              opts: CfgOptions = CfgOptions(), conds_per_image: int = 1) -> tuple[CallShape, ...]:
    """The distinct UNet calls of one CFG step (A1111 `CFGDenoiser.forward`, non-edit models): cond rows are
    `batch * conds_per_image` (AND-composed prompts), uncond rows `batch`."""
    cond_rows, uncond_rows = batch * conds_per_image, batch
    if cond_chunks != uncond_chunks:
        if opts.pad_cond_uncond_v0:
            uncond_chunks = cond_chunks  # uncond padded or truncated to the cond's length
        elif opts.pad_cond_uncond:
            cond_chunks = uncond_chunks = max(cond_chunks, uncond_chunks)
    calls: list[CallShape] = []

    def add(rows: int, chunks: int) -> None:
        shape = CallShape(rows, height, width, chunks)
        if shape not in calls:
            calls.append(shape)

    if cond_chunks == uncond_chunks:
        total = cond_rows + uncond_rows
        if opts.batch_cond_uncond:
            add(total, cond_chunks)
        else:  # slices of `batch` rows
            for start in range(0, total, batch):
                add(min(batch, total - start), cond_chunks)
        if opts.may_skip_uncond:
            add(cond_rows, cond_chunks) if opts.batch_cond_uncond else add(min(batch, cond_rows), cond_chunks)
    else:  # cond in slices of 2B (B without batch_cond_uncond), then uncond in one call
        step = batch * 2 if opts.batch_cond_uncond else batch
        for start in range(0, cond_rows, step):
            add(min(step, cond_rows - start), cond_chunks)
        add(uncond_rows, uncond_chunks)
        if opts.may_skip_uncond:  # a skipped uncond makes the lengths irrelevant: the cond rows alone
            if opts.batch_cond_uncond:
                add(cond_rows, cond_chunks)
            else:
                for start in range(0, cond_rows, batch):
                    add(min(batch, cond_rows - start), cond_chunks)
    return tuple(calls)


def hires_size(width: int, height: int, scale: float, resize_x: int, resize_y: int) -> tuple[int, int]:
    """Pixel size (width, height) the hires pass samples at: A1111's upscale target, cropped to an explicit
    size of another aspect ratio, in whole latent cells."""
    truncate_x = truncate_y = 0
    if resize_x == 0 and resize_y == 0:
        to_x, to_y = int(width * scale), int(height * scale)
    elif resize_y == 0:
        to_x, to_y = resize_x, resize_x * height // width
    elif resize_x == 0:
        to_x, to_y = resize_y * width // height, resize_y
    else:
        if width / height < resize_x / resize_y:
            to_x, to_y = resize_x, resize_x * height // width
        else:
            to_x, to_y = resize_y * width // height, resize_y
        truncate_x = (to_x - resize_x) // LATENT_FACTOR
        truncate_y = (to_y - resize_y) // LATENT_FACTOR
    return ((to_x // LATENT_FACTOR - truncate_x) * LATENT_FACTOR,
            (to_y // LATENT_FACTOR - truncate_y) * LATENT_FACTOR)


def with_calls(spec: PassSpec, opts: CfgOptions) -> PassSpec:
    """`spec` with the calls its CFG steps make."""
    calls = cfg_calls(spec.batch, spec.height, spec.width, spec.cond_chunks, spec.uncond_chunks, opts,
                      spec.conds_per_image)
    return PassSpec(spec.name, spec.width, spec.height, spec.batch, spec.cond_chunks, spec.uncond_chunks,
                    spec.conds_per_image, spec.checkpoint, calls)


@dataclass(frozen=True)
class HiresSpec:
    """The hires pass: its sampling size, its checkpoint (None: the generation's), prompt chunks, and where in
    the schedule it starts as the refiner switch measures it (1 - denoising strength by noise level)."""

    width: int
    height: int
    cond_chunks: int
    uncond_chunks: int
    checkpoint: str | None = None
    start: float = 0.0


@dataclass(frozen=True)
class GenerationSpec:
    """What decides a generation's UNet calls. `refiner_pass`: A1111's `hires_fix_refiner_pass` option;
    `first_start`: where the first pass starts in the schedule (img2img: 1 - denoising strength)."""

    width: int
    height: int
    batch: int
    cond_chunks: int
    uncond_chunks: int
    conds_per_image: int = 1
    checkpoint: str | None = None
    hires: HiresSpec | None = None
    refiner: str | None = None
    refiner_switch_at: float | None = None
    refiner_pass: str = "second pass"
    first_start: float = 0.0


def plan_passes(gen: GenerationSpec, opts: CfgOptions = CfgOptions()) -> list[PassSpec]:
    """The sampling passes of one generation, each on one checkpoint, with their UNet calls. The hires pass
    starts on its own checkpoint or the generation's (A1111 reloads it); the refiner takes over a pass at
    `refiner_switch_at` (from its first step when that is None or not past where the pass starts; never when
    >= 1), in the passes `refiner_pass` names when hires fix is on."""
    passes = [PassSpec("first pass", gen.width, gen.height, gen.batch, gen.cond_chunks, gen.uncond_chunks,
                       gen.conds_per_image, gen.checkpoint)]
    if gen.hires is not None:
        h = gen.hires
        passes.append(PassSpec("hires pass", h.width, h.height, gen.batch, h.cond_chunks, h.uncond_chunks,
                               gen.conds_per_image, h.checkpoint or gen.checkpoint))
    switch = 0.0 if gen.refiner_switch_at is None else gen.refiner_switch_at  # None: A1111 switches at once
    starts = [gen.first_start, gen.hires.start if gen.hires is not None else 0.0]
    out: list[PassSpec] = []
    for i, p in enumerate(passes):
        refined = bool(gen.refiner) and switch < 1 and (
            gen.hires is None or gen.refiner_pass == "both passes"
            or gen.refiner_pass == ("first pass" if i == 0 else "second pass"))
        if not refined or switch > starts[i]:
            out.append(with_calls(p, opts))
        if refined:
            out.append(with_calls(PassSpec(f"{p.name} (refiner)", p.width, p.height, p.batch, p.cond_chunks,
                                           p.uncond_chunks, p.conds_per_image, gen.refiner), opts))
    return out
