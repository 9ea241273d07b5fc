"""Command-line options generated from a config dataclass: a field's type, default, choices and help are
written once, on the field (`metadata={"help": ..., "choices": ...}`), so a CLI's help cannot go stale."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _base_type(hint):
    """int for `int`, `int | None`, `Optional[int]`; None for anything argparse cannot convert."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    return hint if hint in (int, float, str, bool) else None


def add_options(
    parser, cls, *, only=None, skip=(), defaults=None, group: str | None = None, prefix: str = ""
):
    """Add `--field-name` for each field of dataclass `cls` (or those in `only`) that has a help text.

    `defaults` overrides the dataclass defaults shown and used (e.g. a job's own default); a field whose
    default is None shows "default: <its help's wording>". `prefix` names the options `--<prefix><field>`
    (e.g. "eval-" for `--eval-horizon`). Returns the argparse group used."""
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(group) if group else parser
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip or "help" not in f.metadata:
            continue
        kind = _base_type(hints[f.name])
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: type {hints[f.name]} has no command-line form")
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = (prefix + f.name).replace("-", "_")
        text = f.metadata["help"]
        if default is not None and kind is not bool:
            text += f" (default: {default})"
        if kind is bool:
            target.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text
            )
            continue
        target.add_argument(
            flag,
            dest=dest,
            type=kind,
            default=default,
            choices=f.metadata.get("choices"),
            metavar=f.metadata.get("metavar"),
            help=text,
        )
    return target


def from_namespace(cls, args: argparse.Namespace, *, prefix: str = "", **extra):
    """An instance of `cls` from the parsed options that name its fields (plus `extra`)."""
    given = vars(args)
    dests = {f.name: (prefix + f.name).replace("-", "_") for f in dataclasses.fields(cls)}
    values = {name: given[dest] for name, dest in dests.items() if dest in given}
    return cls(**{**values, **extra})
