"""`modules/sd_hijack.py`: at import, routes the class-level `forward` of both ldm and sgm `UNetModel` through
`sd_unet.create_unet_forward` (v1.7+), keeping the originals as `ldm_original_forward`/`sgm_original_forward`.
Attention optimizations are only recorded (the fake UNet always uses torch SDPA)."""

from __future__ import annotations

import ldm.modules.diffusionmodules.openaimodel
import sgm.modules.diffusionmodules.openaimodel
import torch

from modules import devices, errors, patches, script_callbacks, sd_hijack_unet, sd_unet, shared  # noqa: F401


class SdOptimization:
    name: str = None  # type: ignore[assignment]
    label: str | None = None
    cmd_opt: str | None = None
    priority: int = 0

    def title(self):  # type: ignore[no-untyped-def]
        if self.label is None:
            return self.name
        return f"{self.name} - {self.label}"

    def is_available(self):  # type: ignore[no-untyped-def]
        return True

    def apply(self):  # type: ignore[no-untyped-def]
        pass

    def undo(self):  # type: ignore[no-untyped-def]
        pass


def _opt(name, priority, cmd_opt=None, label=None):  # type: ignore[no-untyped-def]
    o = SdOptimization()
    o.name, o.priority, o.cmd_opt, o.label = name, priority, cmd_opt, label
    return o


def builtin_optimizers():  # type: ignore[no-untyped-def]
    return [_opt("sdp-no-mem", 80, "opt_sdp_no_mem_attention", "scaled dot product without memory efficient attention"),
            _opt("sdp", 70, "opt_sdp_attention", "scaled dot product"),
            _opt("Doggettx", 90, "opt_split_attention"),
            _opt("sub-quadratic", 1000 if devices.has_mps() else 10, "opt_sub_quad_attention"),
            _opt("V1", 10, "opt_split_attention_v1", "original v1"),
            _opt("InvokeAI", 10 if torch.cuda.is_available() else 1000, "opt_split_attention_invokeai")]


optimizers: list[SdOptimization] = []
current_optimizer: SdOptimization | None = None

ldm_original_forward = patches.patch(__file__, ldm.modules.diffusionmodules.openaimodel.UNetModel, "forward",
                                     sd_unet.create_unet_forward(ldm.modules.diffusionmodules.openaimodel.UNetModel.forward))
sgm_original_forward = patches.patch(__file__, sgm.modules.diffusionmodules.openaimodel.UNetModel, "forward",
                                     sd_unet.create_unet_forward(sgm.modules.diffusionmodules.openaimodel.UNetModel.forward))


def list_optimizers():  # type: ignore[no-untyped-def]
    new_optimizers = script_callbacks.list_optimizers_callback() + builtin_optimizers()
    new_optimizers = [x for x in new_optimizers if x.is_available()]
    new_optimizers = sorted(new_optimizers, key=lambda x: x.priority, reverse=True)
    optimizers.clear()
    optimizers.extend(new_optimizers)


def apply_optimizations(option=None):  # type: ignore[no-untyped-def]
    global current_optimizer
    undo_optimizations()
    if len(optimizers) == 0:
        current_optimizer = None
        return ""
    if current_optimizer is not None:
        current_optimizer.undo()
        current_optimizer = None
    selection = option or shared.opts.cross_attention_optimization
    if selection == "Automatic" and len(optimizers) > 0:
        matching_optimizer = next(iter([x for x in optimizers if x.cmd_opt and getattr(shared.cmd_opts, x.cmd_opt, False)]), optimizers[0])
    else:
        matching_optimizer = next(iter([x for x in optimizers if x.title() == selection]), None)
    if selection == "None" or selection == "Automatic" and shared.cmd_opts.disable_opt_split_attention:
        matching_optimizer = None
    elif matching_optimizer is None:
        matching_optimizer = optimizers[0]
    if matching_optimizer is not None:
        print(f"Applying attention optimization: {matching_optimizer.name}... ", end="")
        matching_optimizer.apply()
        print("done.")
        current_optimizer = matching_optimizer
        return current_optimizer.name
    print("Disabling attention optimization")
    return ""


def undo_optimizations():  # type: ignore[no-untyped-def]
    pass


class EmbeddingDatabase:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.word_embeddings: dict = {}
        self.skipped_embeddings: dict = {}

    def load_textual_inversion_embeddings(self, force_reload=False):  # type: ignore[no-untyped-def]
        pass


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):  # type: ignore[no-untyped-def]
        self.extra_generation_params: dict = {}
        self.comments: list = []
        self.embedding_db = EmbeddingDatabase()
        #: fake-only: every (hijack|undo_hijack, model) call, in order
        self.history: list[tuple[str, object]] = []

    def apply_optimizations(self, option=None):  # type: ignore[no-untyped-def]
        try:
            self.optimization_method = apply_optimizations(option)
        except Exception as e:  # noqa: BLE001
            errors.display(e, "applying cross attention optimization")
            undo_optimizations()

    def convert_sdxl_to_ssd(self, m):  # type: ignore[no-untyped-def]
        pass

    def hijack(self, m):  # type: ignore[no-untyped-def]
        self.history.append(("hijack", m))
        self.layers = list(m.modules())  # A1111 flattens the whole model (every child, recursively)
        self.apply_optimizations()

    def undo_hijack(self, m):  # type: ignore[no-untyped-def]
        self.history.append(("undo_hijack", m))
        self.apply_circular(False)
        self.layers = None
        self.clip = None

    def apply_circular(self, enable):  # type: ignore[no-untyped-def]
        """Tiling: every Conv2d of the model (UNet and VAE) pads circularly, as in A1111."""
        if self.circular_enabled == enable:
            return
        self.circular_enabled = enable
        for layer in [layer for layer in self.layers or () if type(layer) == torch.nn.Conv2d]:
            layer.padding_mode = "circular" if enable else "zeros"

    def clear_comments(self):  # type: ignore[no-untyped-def]
        self.comments = []
        self.extra_generation_params = {}

    def get_prompt_lengths(self, text):  # type: ignore[no-untyped-def]
        import fake_clip

        n = len(fake_clip.tokenize(text))
        return n, fake_clip.chunk_count(text) * fake_clip.TOKENS_PER_CHUNK

    def redo_hijack(self, m):  # type: ignore[no-untyped-def]
        self.undo_hijack(m)
        self.hijack(m)


model_hijack = StableDiffusionModelHijack()
