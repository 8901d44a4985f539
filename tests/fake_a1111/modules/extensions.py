"""Installed extensions: built-in ones (<install>/extensions-builtin) first, then <data-dir>/extensions, honouring
`disabled_extensions`, `disable_all_extensions` and `--disable-(all|extra)-extensions`. The canonical name is the
lower-cased directory name. metadata.ini is read for `[Extension] Requires` only (ordering is by name)."""

from __future__ import annotations

import configparser
import os

from modules import errors, shared
from modules.paths_internal import extensions_builtin_dir, extensions_dir

extensions: list[Extension] = []
extension_paths: dict[str, Extension] = {}


class ExtensionMetadata:
    def __init__(self, path, canonical_name):  # type: ignore[no-untyped-def]
        self.config = configparser.ConfigParser()
        filepath = os.path.join(path, "metadata.ini")
        try:
            self.config.read(filepath)
        except Exception:  # noqa: BLE001
            errors.report(f"Error reading {filepath} for extension {canonical_name}.", exc_info=True)
        self.canonical_name = canonical_name.lower().strip()
        self.requires = [x.strip() for x in self.config.get("Extension", "Requires", fallback="").split(",")
                         if x.strip()]


class Extension:
    def __init__(self, name, path, enabled=True, is_builtin=False, metadata=None):  # type: ignore[no-untyped-def]
        self.name = name
        self.path = path
        self.enabled = enabled
        self.is_builtin = is_builtin
        self.canonical_name = name.lower()
        self.metadata = metadata or ExtensionMetadata(path, name)
        self.remote = None
        self.version = ""
        self.branch = None
        self.commit_hash = ""
        self.have_info_from_repo = False

    def list_files(self, subdir, extension):  # type: ignore[no-untyped-def]
        dirpath = os.path.join(self.path, subdir)
        if not os.path.isdir(dirpath):
            return []
        from modules import scripts

        res = [scripts.ScriptFile(self.path, filename, os.path.join(dirpath, filename))
               for filename in sorted(os.listdir(dirpath))]
        return [x for x in res if os.path.splitext(x.path)[1].lower() == extension and os.path.isfile(x.path)]


def active():  # type: ignore[no-untyped-def]
    if shared.cmd_opts.disable_all_extensions or shared.opts.disable_all_extensions == "all":
        return []
    if shared.cmd_opts.disable_extra_extensions or shared.opts.disable_all_extensions == "extra":
        return [x for x in extensions if x.enabled and x.is_builtin]
    return [x for x in extensions if x.enabled]


def list_extensions():  # type: ignore[no-untyped-def]
    extensions.clear()
    extension_paths.clear()
    for dirname, is_builtin in ((extensions_builtin_dir, True), (extensions_dir, False)):
        if not os.path.isdir(dirname):
            continue
        for name in sorted(os.listdir(dirname)):
            path = os.path.join(dirname, name)
            if not os.path.isdir(path):
                continue
            if is_builtin and name == "Lora" and os.environ.get("FAKE_A1111_NO_LORA") == "1":
                continue  # fake-only switch (FakeHost.boot(lora=False))
            ext = Extension(name, path, enabled=name not in shared.opts.disabled_extensions, is_builtin=is_builtin)
            extensions.append(ext)
            extension_paths[os.path.realpath(path)] = ext
            extension_paths[os.path.abspath(path)] = ext


def find_extension(filename):  # type: ignore[no-untyped-def]
    for candidate in (os.path.abspath(filename), os.path.realpath(filename)):
        parentdir = os.path.dirname(candidate)
        while parentdir != os.path.dirname(parentdir):
            if parentdir in extension_paths:
                return extension_paths[parentdir]
            parentdir = os.path.dirname(parentdir)
    return None
