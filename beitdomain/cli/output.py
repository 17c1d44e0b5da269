"""What a command prints as its result: human text on stdout, or JSON with the global --json.

Logs, warnings and progress go to stderr (`setup_logging`, `beitdomain.progress`), so stdout
holds only the result: `beitdomain --json data scan DIR | jq .n_images` works, and so does
`beitdomain data scan DIR > summary.txt`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


class _Switches:
    """This process's output switches, set once per invocation by the root callback."""

    json = False


def set_json(value: bool) -> None:
    """Set by the global --json (each invocation sets it afresh) and by a command's --json."""
    _Switches.json = bool(value)


def json_requested() -> bool:
    """Whether --json was given (globally or to the command)."""
    return _Switches.json


def request_json(value: bool) -> None:
    """A command-level `--json` turns the switch on; it never turns the global one off."""
    if value:
        set_json(True)


def _json_ready(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_ready(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        return _json_ready(v.item())
    return v


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout (paths as strings, NaN as null)."""
    sys.stdout.write(json.dumps(_json_ready(data), indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_result(text: str, result: Any) -> None:
    """A command's final line on stdout, or `result` as JSON with --json."""
    if json_requested():
        print_json(result)
        return
    from rich.console import Console

    Console(file=sys.stdout, highlight=False).print(text)


def print_kv(title: str, rows: dict[str, Any], result: Any = None) -> None:
    """A two-column table on stdout; with --json, `result` (or `rows`) as JSON."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if json_requested():
        print_json(rows if result is None else result)
        return

    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in rows.items():
        table.add_row(escape(str(k)), escape(str(v)))
    Console(file=sys.stdout).print(table)


def print_run(command: str, out: Path, rows: dict[str, Any], result: dict[str, Any]) -> None:
    """A finished job's table, titled `<command> -> <out>`; with --json, `result` and `out`."""
    print_kv(f"{command} -> {out}", rows, result={"out": str(out), **result})


def print_efficiency(out: Path, result: dict[str, Any], where: str) -> None:
    """A curve's label-efficiency statements, then `where` (its files); with --json, `result`
    and `out`."""
    lines = [eff["statement"] for eff in result.get("efficiency", [])]
    print_result("\n".join([*lines, where]), {"out": str(out), **result})
