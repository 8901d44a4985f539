from __future__ import annotations


def configure_opts_onchange():  # type: ignore[no-untyped-def]
    """The built-in onchange handlers (initialize_util.py): checkpoint and attention optimization. NOT sd_unet."""
    from modules import sd_hijack, sd_models, shared
    from modules.call_queue import wrap_queued_call

    shared.opts.onchange("sd_model_checkpoint", wrap_queued_call(lambda: sd_models.reload_model_weights()),
                         call=False)
    shared.opts.onchange("cross_attention_optimization",
                         wrap_queued_call(lambda: sd_hijack.model_hijack.redo_hijack(shared.sd_model)), call=False)
