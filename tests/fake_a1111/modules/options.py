"""Settings: `OptionInfo`, `options_section`, `Options`, semantics of A1111 v1.10.1 `modules/options.py`.

- `Options.data` starts as every default; `load()` *replaces* it with config.json, so only keys in the file (or
  added later through `add_option`) are in `data` (this is what makes override_settings restore only those keys).
- `__getattr__` falls back to `data_labels[key].default`.
- `set(key, value, is_api=False, run_callbacks=True)`: no-op (False) when unchanged; KeyError for unknown keys;
  False for `restrict_api` through the API; runs `onchange()` and reverts on exception.
- `setattr(opts, key, value)` writes `data` without callbacks (frozen settings raise RuntimeError)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from modules import errors
from modules.shared_cmd_options import cmd_opts


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,  # type: ignore[no-untyped-def]
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label, url):  # type: ignore[no-untyped-def]
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label, js_func):  # type: ignore[no-untyped-def]
        self.comment_before += f"[<a onclick='{js_func}(); return false'>{label}</a>]"
        return self

    def info(self, info):  # type: ignore[no-untyped-def]
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html):  # type: ignore[no-untyped-def]
        self.comment_after += html
        return self

    def needs_restart(self):  # type: ignore[no-untyped-def]
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self):  # type: ignore[no-untyped-def]
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


class OptionHTML(OptionInfo):
    def __init__(self, text):  # type: ignore[no-untyped-def]
        super().__init__(str(text).strip(), label="", component=None)
        self.do_not_save = True


def options_section(section_identifier, options_dict):  # type: ignore[no-untyped-def]
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


options_builtin_fields = {"data_labels", "data", "restricted_opts", "typemap"}


class Options:
    typemap = {int: float}  # noqa: RUF012

    def __init__(self, data_labels: dict[str, OptionInfo], restricted_opts):  # type: ignore[no-untyped-def]
        self.data_labels = data_labels
        self.data = {k: v.default for k, v in self.data_labels.items() if not v.do_not_save}
        self.restricted_opts = restricted_opts

    def __setattr__(self, key, value):  # type: ignore[no-untyped-def]
        if key in options_builtin_fields:
            return super().__setattr__(key, value)
        if self.data is not None and (key in self.data or key in self.data_labels):
            if cmd_opts.freeze_settings:
                raise RuntimeError("Settings are frozen")
            info = self.data_labels.get(key, None)
            if info is not None and info.do_not_save:
                return None
            comp_args = info.component_args if info else None
            if isinstance(comp_args, dict) and comp_args.get("visible", True) is False:
                raise RuntimeError(f"not possible to set '{key}' because it is restricted")
            if cmd_opts.freeze_settings_in_sections is not None and info is not None and info.section:  # noqa: SIM102
                if info.section[0] in [s.strip() for s in cmd_opts.freeze_settings_in_sections.split(",")]:
                    raise RuntimeError(f"not possible to set '{key}' because settings in section are frozen")
            if cmd_opts.freeze_specific_settings is not None:  # noqa: SIM102
                if key in [s.strip() for s in cmd_opts.freeze_specific_settings.split(",")]:
                    raise RuntimeError(f"not possible to set '{key}' because this setting is frozen")
            if cmd_opts.hide_ui_dir_config and key in self.restricted_opts:
                raise RuntimeError(f"not possible to set '{key}' because it is restricted")
            self.data[key] = value
            return None
        return super().__setattr__(key, value)

    def __getattr__(self, item):  # type: ignore[no-untyped-def]
        if item in options_builtin_fields:
            return super().__getattribute__(item)
        if self.data is not None and item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        return super().__getattribute__(item)

    def set(self, key, value, is_api=False, run_callbacks=True):  # type: ignore[no-untyped-def]
        """Sets an option and calls its onchange callback, returning True if the option changed."""
        oldval = self.data.get(key, None)
        if oldval == value:
            return False
        option = self.data_labels[key]
        if option.do_not_save:
            return False
        if is_api and option.restrict_api:
            return False
        try:
            setattr(self, key, value)
        except RuntimeError:
            return False
        if run_callbacks and option.onchange is not None:
            try:
                option.onchange()
            except Exception as e:  # noqa: BLE001
                errors.display(e, f"changing setting {key} to {value}")
                setattr(self, key, oldval)
                return False
        return True

    def get_default(self, key):  # type: ignore[no-untyped-def]
        data_label = self.data_labels.get(key)
        if data_label is None:
            return None
        return data_label.default

    def save(self, filename):  # type: ignore[no-untyped-def]
        assert not cmd_opts.freeze_settings, "saving settings is disabled"
        with open(filename, "w", encoding="utf8") as file:
            json.dump(self.data, file, indent=4, ensure_ascii=False)

    def same_type(self, x, y):  # type: ignore[no-untyped-def]
        if x is None or y is None:
            return True
        type_x = self.typemap.get(type(x), type(x))
        type_y = self.typemap.get(type(y), type(y))
        return type_x == type_y

    def load(self, filename):  # type: ignore[no-untyped-def]
        try:
            with open(filename, encoding="utf8") as file:
                self.data = json.load(file)
        except FileNotFoundError:
            raise
        except Exception:  # noqa: BLE001
            errors.report(f"\nCould not load settings\nThe config file \"{filename}\" is likely corrupted\n",
                          exc_info=True)
            os.replace(filename, os.path.join(os.path.dirname(filename), "tmp", "config.json"))
            self.data = {}
        bad = 0
        for k, v in self.data.items():
            info = self.data_labels.get(k, None)
            if info is not None and not self.same_type(info.default, v):
                print(f"Warning: bad setting value: {k}: {v} ({type(v).__name__}; "
                      f"expected {type(info.default).__name__})")
                bad += 1
        if bad:
            print(f"The program is likely to not work with bad settings.\nSettings file: {filename}")

    def onchange(self, key, func, call=True):  # type: ignore[no-untyped-def]
        item = self.data_labels.get(key)
        item.onchange = func
        if call:
            func()

    def dumpjson(self):  # type: ignore[no-untyped-def]
        d = {k: self.data.get(k, v.default) for k, v in self.data_labels.items()}
        return json.dumps(d)

    def add_option(self, key, info):  # type: ignore[no-untyped-def]
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def reorder(self):  # type: ignore[no-untyped-def]
        """Sort by category then section; rebinds `data_labels` to a NEW dict (so `shared.options_templates`
        stops being the same object, as in A1111)."""
        category_ids = {}
        section_categories = {}
        settings_items = self.data_labels.items()
        for _, item in settings_items:
            if item.section not in section_categories:
                section_categories[item.section] = item.category_id
        for _, item in settings_items:
            item.category_id = section_categories.get(item.section)
        for category_id in categories.mapping:
            if category_id not in category_ids:
                category_ids[category_id] = len(category_ids)

        def sort_key(x):  # type: ignore[no-untyped-def]
            item: OptionInfo = x[1]
            category_order = category_ids.get(item.category_id, len(category_ids))
            section_order = item.section[1] if item.section else ""
            return category_order, section_order

        self.data_labels = dict(sorted(settings_items, key=sort_key))

    def cast_value(self, key, value):  # type: ignore[no-untyped-def]
        if value is None:
            return None
        default_value = self.data_labels[key].default
        if default_value is None:
            default_value = getattr(self, key, None)
        if default_value is None:
            return None
        expected_type = type(default_value)
        if expected_type is bool and value == "False":
            value = False
        else:
            value = expected_type(value)
        return value


@dataclass
class OptionsCategory:
    id: str
    label: str


class OptionsCategories:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.mapping: dict[str, OptionsCategory] = {}

    def register_category(self, category_id, label):  # type: ignore[no-untyped-def]
        if category_id in self.mapping:
            return category_id
        self.mapping[category_id] = OptionsCategory(category_id, label)
        return category_id


categories = OptionsCategories()
