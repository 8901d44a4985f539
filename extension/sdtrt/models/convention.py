"""The engine convention: how a UNet's decoder brings an upsampled tensor to the size of the skip connection it is
concatenated with. The one place for the two names.

- `A1111`: upsample x2, then resize (nearest) to the skip's size inside the concatenation (A1111's `cat` patch);
- `FORGE`: upsample straight to the next skip connection's size (Forge's `Upsample(x, output_shape)`).

Both compute the same where every level halves exactly, i.e. latent sides that are multiples of 8 (images in
multiples of 64 px; SD's UNets downsample at most three times). At other sizes they differ (the 3x3 convolution
after the upsampling sees another grid), so an engine records its convention (in its contract's io record, hence its
id) and serves such sizes only in the host whose convention it follows.
"""

from __future__ import annotations

from sdtrt.errors import SdtrtError

A1111 = "a1111"
FORGE = "forge"
CONVENTIONS = (A1111, FORGE)
#: who computes that way (for messages)
HOSTS = {A1111: "A1111", FORGE: "Forge"}
#: what each convention does (for the tab and the documentation)
LABELS = {A1111: "A1111: upsample x2, resize in the skip concatenation",
          FORGE: "Forge: upsample to the skip connection's size"}
#: latent sides at which the two conventions compute the same
ALIGNED_LATENT = 8


def check_convention(value: object) -> str:
    """`value` if it names a convention, else SdtrtError naming the choices."""
    if isinstance(value, str) and value in CONVENTIONS:
        return value
    raise SdtrtError(f"convention must be {' or '.join(repr(c) for c in CONVENTIONS)} (the host whose UNet numerics "
                     f"the engine follows: {'; '.join(LABELS[c] for c in CONVENTIONS)}), not {value!r}")


def aligned(height: int, width: int) -> bool:
    """Whether both conventions compute the same at this latent size."""
    return height % ALIGNED_LATENT == 0 and width % ALIGNED_LATENT == 0


#: the part of every `mismatch` reason that tells it apart from other fallback reasons
MISMATCH_MARK = "differently: build an engine with the "


def mismatch(engine: str, host: str, height: int, width: int, engine_id: str | None = None) -> str | None:
    """Why an engine following `engine` cannot serve a UNet call of this latent size in a host computing as `host`,
    or None when it can."""
    if engine == host or aligned(height, width):
        return None
    which = f"engine {engine_id}" if engine_id else "the engine"
    return (f"{which} follows {HOSTS.get(engine, engine)}'s upsampling; {HOSTS.get(host, host)} computes sizes that "
            f"are not multiples of {ALIGNED_LATENT * 8} px {MISMATCH_MARK}{HOSTS.get(host, host)} convention "
            f"(TensorRT tab: Convention; API: \"convention\": \"{host}\"; CLI: --convention {host})")


def is_mismatch(reason: str | None) -> bool:
    """Whether a fallback reason is `mismatch`'s (a build in the host's convention fixes it)."""
    return reason is not None and MISMATCH_MARK in reason
