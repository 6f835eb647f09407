"""Finding plugins: the ``imserver.workers`` entry point group.

A package that ships a plugin declares, in its pyproject.toml::

    [project.entry-points."imserver.workers"]
    myplugin = "mypackage.plugin:MyPlugin"

and ``imserver worker myplugin`` (or ``imserver serve --workers myplugin``) runs it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ._plugin import Plugin

GROUP = "imserver.workers"


def available() -> dict[str, str]:
    """Plugin name -> "module:Class" for every installed plugin."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load(name: str) -> type[Plugin]:
    """A plugin class by entry point name, or by "package.module:Class" (development)."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise TypeError(f"{name!r} is not a Plugin subclass")
        return cls
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Plugin)):
                raise TypeError(f"entry point {name!r} is not a Plugin subclass")
            return cls
    known = ", ".join(sorted(available())) or "none"
    raise LookupError(f"no worker plugin named {name!r} (installed: {known})")
