"""Sampler registry. The fake has the k-diffusion "Euler" and "Euler a" samplers and the "Automatic" schedule only;
other names are unknown (the API answers 400, as v1.10 does for an unknown sampler)."""

from __future__ import annotations

import logging

from modules import sd_samplers_common, sd_samplers_kdiffusion

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion]
all_samplers_map = {x.name: x for x in all_samplers}
samplers = all_samplers
samplers_for_img2img = all_samplers
samplers_map: dict[str, str] = {}


class Scheduler:
    def __init__(self, name, label, aliases=None):  # type: ignore[no-untyped-def]
        self.name, self.label, self.aliases = name, label, aliases or []


schedulers = [Scheduler("automatic", "Automatic")]
schedulers_map = {**{x.name: x for x in schedulers}, **{x.label: x for x in schedulers}}


def find_sampler_config(name):  # type: ignore[no-untyped-def]
    if name is not None:
        return all_samplers_map.get(name, None)
    return all_samplers[0]


def create_sampler(name, model):  # type: ignore[no-untyped-def]
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def set_samplers():  # type: ignore[no-untyped-def]
    samplers_map.clear()
    for sampler in all_samplers:
        samplers_map[sampler.name.lower()] = sampler.name
        for alias in sampler.aliases:
            samplers_map[alias.lower()] = sampler.name


def visible_sampler_names():  # type: ignore[no-untyped-def]
    return [x.name for x in samplers]


def get_sampler_and_scheduler(sampler_name, scheduler_name, *, convert_automatic=True):  # type: ignore[no-untyped-def]
    default_sampler = samplers[0]
    found_scheduler = schedulers_map.get(scheduler_name, schedulers[0])
    name = sampler_name or default_sampler.name
    for scheduler in schedulers:
        for name_option in [scheduler.label, scheduler.name, *scheduler.aliases]:
            if name.endswith(" " + name_option):
                found_scheduler = scheduler
                name = name[0:-(len(name_option) + 1)]
                break
    sampler = all_samplers_map.get(name)
    return (sampler.name if sampler else name), found_scheduler.label


def fix_p_invalid_sampler_and_scheduler(p):  # type: ignore[no-untyped-def]
    i_sampler_name, i_scheduler = p.sampler_name, p.scheduler
    p.sampler_name, p.scheduler = get_sampler_and_scheduler(p.sampler_name, p.scheduler, convert_automatic=False)
    if p.sampler_name != i_sampler_name or i_scheduler != p.scheduler:
        logging.warning(f'Sampler Scheduler autocorrection: "{i_sampler_name}" -> "{p.sampler_name}", '  # noqa: LOG015
                        f'"{i_scheduler}" -> "{p.scheduler}"')


sd_samplers_common  # noqa: B018
