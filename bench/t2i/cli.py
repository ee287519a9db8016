"""One flag mechanism for every command: a dataclass per command, flags built from its fields.

Each field is declared with :func:`opt`, which carries its ``--help`` text (and choices,
metavar, whether it is required) in the field's metadata, so the help can never drift from
the code. :func:`parse` builds the parser, reads ``--config file.json`` (any field, by name),
lets the flags override it, checks what is required, and returns the dataclass.
Precedence: dataclass defaults < ``--config`` < flags. A value nobody gave is ``None``,
never a sentinel such as ``""`` or ``0``. Bad input is one :class:`UsageError` (exit 2).

Shared flag groups (model, device/dtype, sampling, output) are dataclasses that a command's
dataclass inherits, so each flag is declared once. There is one dtype vocabulary:
``fp32 | bf16 | fp16``; the long torch names (``float32``, ...) are accepted as aliases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.t2i.backbones import BACKBONES
from bench.t2i.errors import UsageError
from minddspo.extras import missing_extra

T = TypeVar("T")

PREDICTION_TYPES = ("epsilon", "v_prediction")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def opt(
    default: Any = None,
    help: str = "",
    *,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    required: bool = False,
    parse: Callable[[str], Any] | None = None,
    flag: str | None = None,
    nargs: int | str | None = None,
    const: Any = None,
) -> Any:
    """A dataclass field with its ``--help`` text. ``parse`` converts the flag's string
    (``type=`` of argparse); list fields repeat the flag; ``flag`` overrides the flag name
    (default ``--field-name``); ``nargs`` makes a list field one flag of that many values,
    or ``"?"`` a flag whose value may be left out (the field is then ``const``; in a
    ``--config`` file ``true`` stands for the bare flag and ``false`` for no flag)."""
    meta = dict(
        help=help,
        choices=choices,
        metavar=metavar,
        required=required,
        parse=parse,
        flag=flag,
        nargs=nargs,
        const=const,
    )
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def dtype_name(value: str) -> str:
    """Canonical dtype name (``fp32``/``bf16``/``fp16``) of ``value`` or one of its aliases."""
    name = DTYPE_ALIASES.get(value, value)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {value!r}; choose one of {', '.join(DTYPES)} "
            f"(or {', '.join(DTYPE_ALIASES)})"
        )
    return name


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[dtype_name(name)]


def flag(name: str, cls: type | None = None) -> str:
    """The command-line flag of field ``name`` (of dataclass ``cls``, which may rename it)."""
    if cls is not None:
        for f in fields(cls):
            if f.name == name and f.metadata.get("flag"):
                return f.metadata["flag"]
    return "--" + name.replace("_", "-")


#: ``--tiny [NAME]`` of every command: a tiny random backbone built from configs
TINY_HELP = "tiny random backbone NAME built from configs (tests, smoke runs); bare --tiny: sd"


@dataclass
class ModelArgs:
    """Which network: a local diffusers pipeline or the tiny random one."""

    pretrained: str | None = opt(None, "local diffusers pipeline directory", metavar="DIR")
    tiny: str | None = opt(None, TINY_HELP, choices=BACKBONES, nargs="?", const="sd")


def tiny_name(tiny: str | bool | None, backbone: str | None) -> str | None:
    """The tiny backbone of ``--tiny [NAME]`` and the older ``--tiny --backbone NAME`` (a bare
    ``--tiny`` is ``True``): None when not tiny; a NAME that ``--backbone`` contradicts is
    refused."""
    if not tiny:
        return None
    if tiny is True:
        return backbone or "sd"
    if backbone and backbone != tiny:
        raise UsageError(
            f"--tiny {tiny} and --backbone {backbone} name two backbones: give --tiny NAME alone"
        )
    return tiny


@dataclass
class PredictionArgs:
    prediction_type: str | None = opt(
        None, "override the scheduler's prediction type (SD/SDXL)", choices=PREDICTION_TYPES
    )


@dataclass
class DeviceArgs:
    device: str | None = opt(None, "default: cuda:LOCAL_RANK if available, else cpu")
    dtype: str = opt(
        "fp32", "compute dtype of the networks", choices=tuple(DTYPES), parse=dtype_name
    )


@dataclass
class SamplingArgs:
    steps: int | None = opt(None, "sampling steps (default: the backbone's paper setting)")
    guidance: float | None = opt(
        None,
        "CFG scale; flux: the guidance-embedding value, no CFG (default: the backbone's paper setting; flux: FluxPipeline's 3.5)",
    )
    resolution: int | None = opt(None, "image side in pixels (default: the model's)")
    seed: int = opt(0, "base seed; prompt i starts from the noise of (seed, i)")


@dataclass
class PromptArgs:
    prompts: str | None = opt(
        None,
        '.txt (one per line) or .jsonl ({"prompt": ...}); default with --tiny: demo prompts',
        metavar="FILE",
    )
    max_prompts: int | None = opt(None, "use only the first N prompts")


@dataclass
class OutputArgs:
    out: str | None = opt(None, "output directory", metavar="DIR", required=True)
    progress: bool = opt(True, "progress bar (--no-progress: none)")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> tuple[type, bool]:
    """``(scalar type, is_list)`` of a field annotation such as ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if f.metadata.get("required"):
        text += " (required)"
    elif f.default is not dataclasses.MISSING and not any(
        f.default is x for x in (None, False, True)
    ):
        text += f" (default: {f.default})"
    return text.replace("%", "%%")


def build_parser(
    cls: type,
    *,
    prog: str,
    description: str,
    epilog: str | None = None,
    with_config: bool = True,
) -> argparse.ArgumentParser:
    """``--config`` (unless ``with_config`` is false) plus one flag per field of ``cls``
    (defaults ``None``: unset)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if with_config:
        p.add_argument(
            "--config", metavar="FILE", help="JSON object of field values (flags override it)"
        )
    hints, sections = _hints(cls), {}
    for f in fields(cls):
        title = _section(cls, f.name)
        if title and title not in sections:
            sections[title] = p.add_argument_group(title)
        g = sections.get(title, p)
        kind, many = _base_type(hints[f.name])
        m = f.metadata
        kw: dict[str, Any] = dict(default=None, help=_help(f), dest=f.name)
        if kind is bool:
            g.add_argument(flag(f.name, cls), action=argparse.BooleanOptionalAction, **kw)
            continue
        kw.update(type=m.get("parse") or kind, choices=m.get("choices"))
        kw["metavar"] = m.get("metavar") or (None if m.get("choices") else kind.__name__.upper())
        if m.get("nargs") == "?":
            g.add_argument(flag(f.name, cls), nargs="?", const=m.get("const"), **kw)
        elif m.get("nargs"):
            g.add_argument(flag(f.name, cls), nargs=m["nargs"], **kw)
        else:
            g.add_argument(flag(f.name, cls), action="append" if many else "store", **kw)
    return p


def _section(cls: type, name: str) -> str | None:
    """The ``--help`` section of field ``name``: the ``help_section`` of the dataclass base
    of ``cls`` that declares it (an option group that names one), else None."""
    for base in reversed(cls.__mro__[1:]):
        own = getattr(base, "__dataclass_fields__", {}).keys() - {
            n for b in base.__bases__ for n in getattr(b, "__dataclass_fields__", {})
        }
        if name in own:
            return base.__dict__.get("help_section")
    return None


def load_config(path: str, cls: type) -> dict[str, Any]:
    """The fields set by a ``--config`` JSON file, type-checked against ``cls``."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:  # json would keep the last one silently
                raise UsageError(f"--config {path}: key {key!r} given twice")
            seen[key] = value
        return seen

    try:
        raw = json.loads(Path(path).read_text(), object_pairs_hook=no_duplicates)
    except FileNotFoundError:
        raise UsageError(f"--config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--config {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path} must hold a JSON object")
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls)}
    renamed = {
        f.metadata["flag"].lstrip("-"): f.name for f in fields(cls) if f.metadata.get("flag")
    }
    out, keys = {}, {}
    for key, value in raw.items():
        name = renamed.get(key.lstrip("-"), key.replace("-", "_"))
        if name not in known:
            raise UsageError(f"--config {path}: unknown field {key!r}")
        if name in keys:
            raise UsageError(f"--config {path}: keys {keys[name]!r} and {key!r} set the same field")
        keys[name] = key
        out[name] = _checked(path, key, value, hints[name], known[name])
    return out


def _checked(path: str, key: str, value: Any, hint: Any, f: dataclasses.Field) -> Any:
    kind, many = _base_type(hint)
    optional = type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    nargs = f.metadata.get("nargs")
    if nargs == "?" and isinstance(value, bool):  # true: the bare flag; false: not given
        return f.metadata.get("const") if value else None
    if isinstance(nargs, int) and not (isinstance(value, list) and len(value) == nargs):
        raise UsageError(f"--config {path}: {key} must be a list of {nargs} values, got {value!r}")
    items = value if many and isinstance(value, list) else [value]
    out = []
    for v in items:
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise UsageError(f"--config {path}: {key} must be {kind.__name__}, got {v!r}")
        if f.metadata.get("parse") is not None:
            try:
                v = f.metadata["parse"](v)
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise UsageError(f"--config {path}: {key}: {e}") from None
        choices = f.metadata.get("choices")
        if choices is not None and v not in choices:
            raise UsageError(f"--config {path}: {key} must be one of {', '.join(choices)}")
        out.append(v)
    return out if many else out[0]


def parse(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    epilog: str | None = None,
    one_of: Sequence[tuple[str, ...]] = (),
) -> T:
    """Defaults < ``--config`` < flags, as an instance of ``cls``. ``one_of``: groups of
    fields of which exactly one must be given. Raises :class:`UsageError`."""
    cfg, _ = _parse(cls, argv, prog, description, epilog, one_of, known_only=False)
    return cfg


def parse_known(
    cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str
) -> tuple[T, list[str]]:
    """:func:`parse`, but flags ``cls`` does not know are returned (to pass on to another
    command, ``--config`` included) instead of refused; no abbreviations, which would
    swallow a flag meant for that command."""
    return _parse(cls, argv, prog, description, None, (), known_only=True)


def _bare_optional_last(cls: type, args: list[str], moved: dict[str, str]) -> list[str]:
    """``args`` with each ``--flag`` of a ``nargs="?"`` field with choices that is followed by
    a token not among them (an argument of another flag, e.g. ``--from ddspo --tiny SRC``)
    moved to the end of the flags, where argparse cannot take that token as its value;
    ``moved`` gets token -> the invalid-choice error should nothing else take it."""
    for f in fields(cls):
        choices = f.metadata.get("choices")
        if f.metadata.get("nargs") != "?" or not choices:
            continue
        name = flag(f.name, cls)
        end = args.index("--") if "--" in args else len(args)
        i = 0
        while i < end - 1:
            nxt = args[i + 1]
            if args[i] == name and nxt not in choices and not nxt.startswith("-"):
                moved[nxt] = (
                    f"argument {name}: invalid choice: {nxt!r} (choose from "
                    + ", ".join(map(repr, choices))
                    + ")"
                )
                args.insert(end - 1, args.pop(i))
                end -= 1  # the moved flag is checked no more
            else:
                i += 1
    return args


def _parse(cls, argv, prog, description, epilog, one_of, *, known_only: bool):
    parser = build_parser(
        cls, prog=prog, description=description, epilog=epilog, with_config=not known_only
    )
    parser.allow_abbrev = not known_only

    moved: dict[str, str] = {}

    def _error(message: str):  # argparse would print usage and exit; we want one line
        unknown = message.removeprefix("unrecognized arguments: ").split(" ")
        if message.startswith("unrecognized arguments: ") and unknown[0] in moved:
            message = moved[unknown[0]]  # a bad --tiny NAME, not a stray argument
        raise UsageError(message)

    parser.error = _error  # type: ignore[method-assign]
    args = _bare_optional_last(cls, list(sys.argv[1:] if argv is None else argv), moved)
    ns, rest = parser.parse_known_args(args) if known_only else (parser.parse_args(args), [])
    for token in rest:
        if token in moved:  # passed on, it would be refused there as a stray argument
            raise UsageError(moved[token])
    config = getattr(ns, "config", None)
    values = load_config(config, cls) if config else {}
    values.update({k: v for k, v in vars(ns).items() if k != "config" and v is not None})
    for f in fields(cls):
        if f.metadata.get("required") and values.get(f.name) is None:
            raise UsageError(f"the following argument is required: {flag(f.name, cls)}")
    for group in one_of:
        given = [n for n in group if values.get(n) not in (None, False)]
        if len(given) != 1:
            names = " | ".join(flag(n, cls) for n in group)
            raise UsageError(
                f"give exactly one of {names}" + (f" (got {len(given)})" * bool(given))
            )
    return cls(**values), rest


def check_at_least(cfg: Any, names: Sequence[str], low: int) -> None:
    """Each named field, when set, must be >= ``low``; the error names the first that is not,
    with its value."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and v < low:
            raise UsageError(f"{flag(name, type(cfg))} must be >= {low}, got {v}")


def check_positive(cfg: Any, names: Sequence[str]) -> None:
    """Each named field, when set, must be >= 1."""
    check_at_least(cfg, names, 1)


def run_command(main: Callable[[], int]) -> int:
    """Run a command's body: a :class:`UsageError` (bad input) is one ``error:`` line on
    stderr and exit code 2; so is a missing optional package, named with its extra
    (:func:`minddspo.extras.missing_extra`). Anything else, a ``ValueError`` included, is a
    bug and keeps its traceback."""
    try:
        return main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        line = missing_extra(e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
