from __future__ import annotations

import datetime
import threading
import time


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None
    server_start = None
    server_command = None

    def __init__(self):  # type: ignore[no-untyped-def]
        self.server_start = time.time()
        self._server_command_signal = threading.Event()

    def interrupt(self):  # type: ignore[no-untyped-def]
        self.interrupted = True

    def skip(self):  # type: ignore[no-untyped-def]
        self.skipped = True

    def stop_generating(self):  # type: ignore[no-untyped-def]
        self.stopping_generation = True

    def nextjob(self):  # type: ignore[no-untyped-def]
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self):  # type: ignore[no-untyped-def]
        return {
            "skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": self.stopping_generation,
            "job": self.job, "job_count": self.job_count, "job_timestamp": self.job_timestamp,
            "job_no": self.job_no, "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps,
        }

    def begin(self, job: str = "(unknown)"):  # type: ignore[no-untyped-def]
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job

    def end(self):  # type: ignore[no-untyped-def]
        self.job = ""
        self.job_count = 0

    def set_current_image(self):  # type: ignore[no-untyped-def]
        pass

    def assign_current_image(self, image):  # type: ignore[no-untyped-def]
        self.current_image = image
