"""One exception type for every problem a user can fix.

The CLI prints a ``MoesimError`` as one line (``error: ...``) and exits with status 2; any
other exception is a bug and keeps its traceback. Messages name the problem and what to do.
"""


class MoesimError(Exception):
    """A user-facing error: bad input, unknown preset, infeasible plan, solver timeout."""


class TraceError(MoesimError):
    """A trace file or array that does not follow the trace schema."""


class PresetError(MoesimError):
    """An unknown preset name."""


def unknown_name(kind: str, name: str, known) -> PresetError:
    """Error for an unknown preset/policy/format name, listing the valid ones."""
    choices = ", ".join(sorted(known))
    return PresetError(f"unknown {kind} {name!r}; choose one of: {choices}")
