"""The checks every node of the pack shares, so bad input gets a message that names the node and the fix.

Why this exists (ComfyUI 0.3.64, execution.validate_inputs):

* ComfyUI's own min/max and combo-list checks are skipped for every input a node's ``validate_inputs``
  names, and NaN passes its min/max checks anyway (``nan < min`` is False). :func:`checked_inputs` re-checks
  every input against the node's own schema (type, finite, min/max) when the node runs.
* An exception raised inside ``validate_inputs`` reaches the user as "Exception when validating node",
  pinned to the wrong input. :func:`guarded_validation` turns any such exception into a message naming the
  node, the input and the fix.
* A message returned by ``validate_inputs`` is repeated once per input the function takes; so our
  ``validate_inputs`` take exactly one input each, and everything else is checked when the node runs.
* File names from the UI or an API prompt are user text: :func:`check_model_file` and
  :func:`check_output_name` accept only plain names inside their folder.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import unicodedata

from comfy_api.latest import io

# Longest text input accepted (a prompt of this size already takes seconds to tokenize).
MAX_TEXT_LENGTH = 100_000
MAX_FILE_NAME_LENGTH = 200
_FORBIDDEN_NAME_CHARS = set('<>:"|?*\\/')
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)


class NodeError(ValueError):
    """An error shown to the user: '<Node name>: what is wrong. What to do.'"""

    def __init__(self, node: str, message: str):
        # (a message from the engine may already name the node: it is said once)
        super().__init__(message if message.startswith(f"{node}: ") else f"{node}: {message}")


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: user values go into messages, some are huge."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------- validate_inputs


def guarded_validation(node: str, input_name: str, fix: str = ""):
    """Decorate a node's ``validate_inputs`` (one input): any exception becomes a message, never a crash."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # the point: nothing escapes as a raw exception
                detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                hint = f" {fix}" if fix else ""
                return f"{node}: {input_name} could not be checked ({detail[:200]}).{hint}"

        # ComfyUI reads the inputs a validate_inputs takes with getfullargspec, which ignores __wrapped__
        # but honours __signature__: without this it would see (*args, **kwargs) and pass every input.
        wrapper.__signature__ = inspect.signature(fn)
        return wrapper

    return decorate


# ------------------------------------------------------------------------------------- execute checks

_SCHEMA_INPUTS: dict[str, list] = {}


def _schema_inputs(cls) -> list:
    """The node's declared inputs (schema objects), cached per node id."""
    schema = cls.define_schema()
    key = schema.node_id
    if key not in _SCHEMA_INPUTS:
        _SCHEMA_INPUTS[key] = list(schema.inputs)
    return _SCHEMA_INPUTS[key]


def _range_text(inp) -> str:
    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
    if lo is not None and hi is not None:
        return f" between {lo:g} and {hi:g}"
    if lo is not None:
        return f" of at least {lo:g}"
    if hi is not None:
        return f" of at most {hi:g}"
    return ""


def check_input_value(node: str, inp, value) -> None:
    """Raise NodeError unless ``value`` fits the declared input ``inp`` (Float/Int/String/Boolean)."""
    name = inp.id
    if value is None:
        return  # an unconnected optional input
    if isinstance(inp, io.Float.Input):
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok_type or not math.isfinite(float(value)):
            raise NodeError(node, f"{name} is {short_repr(value)}; give a finite number{_range_text(inp)}.")
        _check_range(node, inp, float(value))
    elif isinstance(inp, io.Int.Input):
        if not isinstance(value, int) or isinstance(value, bool):
            raise NodeError(node, f"{name} is {short_repr(value)}; give a whole number{_range_text(inp)}.")
        _check_range(node, inp, value)
    elif isinstance(inp, io.Boolean.Input):
        if not isinstance(value, bool):
            raise NodeError(node, f"{name} is {short_repr(value)}; give true or false.")
    elif isinstance(inp, io.String.Input):
        if not isinstance(value, str):
            raise NodeError(node, f"{name} is a {type(value).__name__} ({short_repr(value)}); give text.")
        if len(value) > MAX_TEXT_LENGTH:
            raise NodeError(
                node, f"{name} is {len(value):,} characters long; at most {MAX_TEXT_LENGTH:,} are accepted."
            )
        if "\x00" in value:
            raise NodeError(node, f"{name} contains a NUL character; remove it.")


def _check_range(node: str, inp, value) -> None:
    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise NodeError(node, f"{inp.id} is {value:g}; give a value{_range_text(inp)}.")


def check_inputs(cls, node: str, values: dict) -> None:
    """Check every declared Float/Int/String/Boolean input present in ``values`` (see the module doc)."""
    for inp in _schema_inputs(cls):
        if inp.id in values:
            check_input_value(node, inp, values[inp.id])


def checked_inputs(node: str):
    """Decorate a node's ``execute`` (under ``@classmethod``): its inputs are checked before it runs."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(cls, *args, **kwargs):
            bound = signature.bind(cls, *args, **kwargs)
            check_inputs(cls, node, {k: v for k, v in bound.arguments.items() if k != "cls"})
            return fn(cls, *args, **kwargs)

        return wrapper

    return decorate


# ------------------------------------------------------------------------------------------ file names


def plain_name_problem(name, allow_subfolders: bool) -> str | None:
    """Why ``name`` is not a plain file name (None when it is one)."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__} ({short_repr(name)}), not a file name"
    if not name.strip():
        return "is empty"
    if len(name) > MAX_FILE_NAME_LENGTH:
        return f"is {len(name)} characters long (at most {MAX_FILE_NAME_LENGTH})"
    if any(unicodedata.category(c).startswith("C") for c in name):
        return "contains control characters (a line break, tab or NUL)"
    parts = re.split(r"[/\\]", name)
    if not allow_subfolders and len(parts) > 1:
        return "contains a folder separator; give a plain file name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or os.path.isabs(name):
        return "is an absolute path; give a name inside the folder"
    for part in parts:
        if part in ("", ".", ".."):
            return "contains '..' or an empty folder name; give a name inside the folder"
        if part != part.strip() or part.endswith("."):
            return "has leading or trailing spaces or dots"
        if any(c in _FORBIDDEN_NAME_CHARS for c in part):
            return 'contains one of the characters < > : " | ? *'
        if _WINDOWS_RESERVED.match(part):
            return f"uses the reserved device name {part!r}"
    return None


def check_output_name(node: str, input_name: str, name: str) -> str:
    """``name`` stripped, if it can be a new file's name in the target folder; else a NodeError."""
    stripped = name.strip() if isinstance(name, str) else name
    problem = plain_name_problem(stripped, allow_subfolders=False)
    if problem:
        raise NodeError(node, f"{input_name} {short_repr(name)} {problem}.")
    if stripped.startswith("."):
        raise NodeError(node, f"{input_name} {short_repr(name)} starts with a dot; give a visible file name.")
    return stripped


def missing_file_message(name: str, folder: str, what: str) -> str:
    from .common import model_folder_paths

    places = ", ".join(model_folder_paths(folder)) or f"models/{folder}"
    return (
        f"{what} '{name}' was not found in models/{folder} (searched: {places}). "
        f"Put the file in that folder, then refresh the node list (press R) and pick it."
    )


def check_model_file(node: str, folder: str, name, what: str) -> bool | str:
    """For ``validate_inputs``: True, or a message naming the file and the folder it belongs in."""
    import folder_paths

    problem = plain_name_problem(name, allow_subfolders=True)
    if problem:
        return f"{node}: the {what} name {short_repr(name)} {problem}. Pick a file from the list."
    if folder_paths.get_full_path(folder, name) is None:
        return f"{node}: " + missing_file_message(name, folder, what)
    return True


def resolve_model_file(node: str, folder: str, name, what: str) -> str:
    """The full path of a model file picked in a combo, or a NodeError naming the file and the folder."""
    import folder_paths

    if isinstance(name, str) and not name.strip():
        raise NodeError(node, f"no {what} selected. Put one in models/{folder} and pick it.")
    problem = plain_name_problem(name, allow_subfolders=True)
    if problem:
        raise NodeError(node, f"the {what} name {short_repr(name)} {problem}. Pick a file from the list.")
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        raise NodeError(node, missing_file_message(name, folder, what))
    return path
