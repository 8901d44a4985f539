from __future__ import annotations

import os
import re


def natural_sort_key(s, regex=re.compile("([0-9]+)")):  # type: ignore[no-untyped-def]
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def listfiles(dirname):  # type: ignore[no-untyped-def]
    filenames = [os.path.join(dirname, x) for x in sorted(os.listdir(dirname), key=natural_sort_key)
                 if not x.startswith(".")]
    return [file for file in filenames if os.path.isfile(file)]


def walk_files(path, allowed_extensions=None):  # type: ignore[no-untyped-def]
    if not os.path.exists(path):
        return
    if allowed_extensions is not None:
        allowed_extensions = set(allowed_extensions)
    items = list(os.walk(path, followlinks=True))
    items = sorted(items, key=lambda x: natural_sort_key(x[0]))
    for root, _, files in items:
        for filename in sorted(files, key=natural_sort_key):
            if allowed_extensions is not None:
                _, ext = os.path.splitext(filename)
                if ext.lower() not in allowed_extensions:
                    continue
            yield os.path.join(root, filename)
