"""Task behaviour lives in the task registry: no module switches on a task's name or kind.

A comparison such as ``task_kind == "depth"`` or ``if task == "normals"`` outside
``lightning_simo/tasks.py`` is how a new task silently gets the wrong behaviour; per-task facts
belong in the task's registration (or, for how a dataset stores a task on disk, in that dataset's
converter table, which maps names to functions without comparing them).
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning_simo.tasks import available_tasks

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_simo"
ALLOWED = {PACKAGE / "tasks.py"}

_NAMES = "|".join(re.escape(n) for n in available_tasks())
_LITERAL = rf"""(["'])(?:{_NAMES})\1"""
PATTERNS = [
    re.compile(r"\w*kind\s*(?:==|!=)"),  # kind == ..., task_kind != ...
    re.compile(r"(?:==|!=)\s*\w*kind\b"),
    re.compile(r"\w*kind\s+(?:not\s+)?in\s*[\(\[\{]"),  # kind in ("depth", ...)
    re.compile(rf"(?:==|!=)\s*{_LITERAL}"),  # x == "depth"
    re.compile(rf"{_LITERAL}\s*(?:==|!=|in\b|not\s+in\b)"),  # "depth" == x, "depth" in tasks
    re.compile(rf"\bin\s*[\(\[\{{][^\n#]*{_LITERAL}"),  # x in ("depth", ...)
]


def switches(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every task-name or kind comparison in ``text``."""
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if any(p.search(line.split("#", 1)[0]) for p in PATTERNS)
    ]


def test_the_patterns_catch_the_switches_they_are_for() -> None:
    caught = [
        'positive = task_kind == "depth"',
        'if kind in ("depth", "regression"):',
        'elif task == "normals":',
        'if "autoencoder" in self.tasks:',
        'if key in ("image", "normals"):',
        "if spec.kind != other.kind:",
    ]
    assert [n for n, _ in switches("\n".join(caught))] == list(range(1, len(caught) + 1))
    fine = [
        'TASK_FOLDERS = {"segmentation": "label", "depth": "depth"}',
        "if kind not in TASK_TYPES:",
        "if config.kind not in HEAD_KINDS:",
        'tasks: list[str] = ["segmentation", "depth"]',
    ]
    assert switches("\n".join(fine)) == []


def test_no_task_kind_switch_outside_the_registry() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in ALLOWED
        for number, line in switches(path.read_text(encoding="utf-8"))
    ]
    assert found == [], "task behaviour must come from the task registry:\n" + "\n".join(found)
