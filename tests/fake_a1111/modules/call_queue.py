from __future__ import annotations

import functools

from modules import fifo_lock, shared

queue_lock = fifo_lock.FIFOLock()


def wrap_queued_call(func):  # type: ignore[no-untyped-def]
    def f(*args, **kwargs):  # type: ignore[no-untyped-def]
        with queue_lock:
            res = func(*args, **kwargs)
        return res

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):  # type: ignore[no-untyped-def]
    @functools.wraps(func)
    def f(*args, **kwargs):  # type: ignore[no-untyped-def]
        with queue_lock:
            shared.state.begin(job=getattr(func, "__name__", "gpu call"))
            try:
                res = func(*args, **kwargs)
            finally:
                shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):  # type: ignore[no-untyped-def]
    @functools.wraps(func)
    def f(*args, **kwargs):  # type: ignore[no-untyped-def]
        return func(*args, **kwargs)

    return f
