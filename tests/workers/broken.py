"""A plugin that cannot start: prints a banner and a raw traceback, then its setup fails
(a bad setting). Used to check what ``serve --workers`` makes of it."""

from __future__ import annotations

import sys
import traceback
from typing import ClassVar

from protocol import WorkerEventKind
from workers.sdk import Plugin, WorkerContext


class BrokenPlugin(Plugin):
    name: ClassVar[str] = "broken"
    kinds: ClassVar[frozenset[WorkerEventKind]] = frozenset({WorkerEventKind.MESSAGE})

    async def setup(self, ctx: WorkerContext) -> None:
        print("a library's start-up banner", file=sys.stderr, flush=True)
        try:
            raise KeyError("what a careless library prints")
        except KeyError:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        raise ValueError(f"bad setting threshold={ctx.config.get('threshold')!r}")
