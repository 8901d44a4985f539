"""Extra networks (`<name:args>` prompt tags): registry, parsing (first prompt's tags only), `activate` (mentioned
networks with their params, every other registered network with [], then `after_extra_networks_activate`), and
`deactivate`, as A1111's extra_networks.py."""

from __future__ import annotations

import logging
import re
from collections import defaultdict

from modules import errors

extra_network_registry: dict = {}
extra_network_aliases: dict = {}


def initialize():  # type: ignore[no-untyped-def]
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network):  # type: ignore[no-untyped-def]
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias):  # type: ignore[no-untyped-def]
    extra_network_aliases[alias] = extra_network


def register_default_extra_networks():  # type: ignore[no-untyped-def]
    register_extra_network(ExtraNetworkHypernet())


class ExtraNetworkParams:
    def __init__(self, items=None):  # type: ignore[no-untyped-def]
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):  # type: ignore[no-untyped-def]
        return self.items == other.items

    def __repr__(self):  # type: ignore[no-untyped-def]
        return f"ExtraNetworkParams({self.items!r})"


class ExtraNetwork:
    def __init__(self, name):  # type: ignore[no-untyped-def]
        self.name = name

    def activate(self, p, params_list):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def deactivate(self, p):  # type: ignore[no-untyped-def]
        raise NotImplementedError


class ExtraNetworkHypernet(ExtraNetwork):
    """The default 'hypernet' network: accepts and ignores its params (no hypernetworks in the fake)."""

    def __init__(self):  # type: ignore[no-untyped-def]
        super().__init__("hypernet")

    def activate(self, p, params_list):  # type: ignore[no-untyped-def]
        pass

    def deactivate(self, p):  # type: ignore[no-untyped-def]
        pass


def lookup_extra_networks(extra_network_data):  # type: ignore[no-untyped-def]
    res: dict = {}
    for extra_network_name, extra_network_args in list(extra_network_data.items()):
        extra_network = extra_network_registry.get(extra_network_name, None)
        alias = extra_network_aliases.get(extra_network_name, None)
        if alias is not None and extra_network is None:
            extra_network = alias
        if extra_network is None:
            logging.info(f"Skipping unknown extra network: {extra_network_name}")  # noqa: LOG015
            continue
        res.setdefault(extra_network, []).extend(extra_network_args)
    return res


def activate(p, extra_network_data):  # type: ignore[no-untyped-def]
    activated = []
    for extra_network, extra_network_args in lookup_extra_networks(extra_network_data).items():
        try:
            extra_network.activate(p, extra_network_args)
            activated.append(extra_network)
        except Exception as e:  # noqa: BLE001
            errors.display(e, f"activating extra network {extra_network.name} with arguments {extra_network_args}")
    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network in activated:
            continue
        try:
            extra_network.activate(p, [])
        except Exception as e:  # noqa: BLE001
            errors.display(e, f"activating extra network {extra_network_name}")
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds,
                                                subseeds=p.subseeds, extra_network_data=extra_network_data)


def deactivate(p, extra_network_data):  # type: ignore[no-untyped-def]
    data = lookup_extra_networks(extra_network_data)
    for extra_network in data:
        try:
            extra_network.deactivate(p)
        except Exception as e:  # noqa: BLE001
            errors.display(e, f"deactivating extra network {extra_network.name}")
    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network in data:
            continue
        try:
            extra_network.deactivate(p)
        except Exception as e:  # noqa: BLE001
            errors.display(e, f"deactivating unmentioned extra network {extra_network_name}")


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):  # type: ignore[no-untyped-def]
    res: defaultdict = defaultdict(list)

    def found(m):  # type: ignore[no-untyped-def]
        name = m.group(1)
        args = m.group(2)
        res[name].append(ExtraNetworkParams(items=args.split(":")))
        return ""

    prompt = re.sub(re_extra_net, found, prompt)
    return prompt, res


def parse_prompts(prompts):  # type: ignore[no-untyped-def]
    res = []
    extra_data = None
    for prompt in prompts:
        updated_prompt, parsed_extra_data = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed_extra_data
        res.append(updated_prompt)
    return res, extra_data
