"""Library messages in the CLI's words: a parameter the library names as `input_size` is
``--input-size`` here, as the running command spells it."""

from __future__ import annotations

import re

import click

# Library parameters whose flag is not ``--`` plus their name (or that no option of that
# name spells): the library says `duration_s`, the CLI --duration.
FLAG_ALIASES = {"trt_cache_dir": "--trt-cache", "provider": "--provider", "check": "--no-check",
                "duration_s": "--duration", "plot": "--plot", "instance_count": "--instances",
                "max_queue_delay_us": "--queue-delay-us",
                "preferred_batch_sizes": "--preferred-batch-size",
                "ready_timeout_s": "--ready-timeout"}
PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")


def phrase(text: str) -> str:
    """The library names parameters as `name`; a user of the CLI reads its flags. The
    running command's own options win, then any command's, then the aliases."""
    flags = _flags()
    return PARAMETER.sub(lambda m: flags.get(m.group(1), m.group(0)), text)


def _flags() -> dict[str, str]:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root().command if ctx is not None else None
    commands = list(getattr(root, "commands", {}).values())
    current = ctx.command if ctx is not None else None
    table: dict[str, str] = dict(FLAG_ALIASES)
    for command in [*commands, *([current] if current is not None else [])]:
        for param in command.params:
            if isinstance(param, click.Option) and param.name:
                longest = max(param.opts, key=len)
                if command is current or param.name not in table:
                    table[param.name] = longest
    return table
