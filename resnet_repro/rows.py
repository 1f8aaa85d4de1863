"""The mmpretrain ResNet table as data: its 22 rows, their config-group choices and published numbers.

`reference.csv` is a copy of `shared/spec/reference.csv`; each row names the five group choices
(depth, stem, dataset, recipe, precision) that compose it, so a composition is a table row exactly
when its choices match one line of the file.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources

GROUPS = ("model", "stem", "dataset", "recipe", "precision")
SECTIONS = ("ImageNet-1k", "CIFAR-10", "CIFAR-100", "CUB-200-2011")


@dataclass(frozen=True)
class Row:
    name: str
    section: str
    depth: int
    stem: str
    dataset: str
    recipe: str
    precision: str
    num_classes: int
    flops_input_px: int
    pretrain: str
    params_m_table: float
    params_exact: int
    flops_g_table: float
    top1_table: float
    top5_table: float | None
    checkpoint_url: str

    @property
    def choices(self) -> dict[str, str]:
        """The config-group options that compose this row."""
        return {
            "model": f"resnet{self.depth}",
            "stem": self.stem,
            "dataset": self.dataset,
            "recipe": self.recipe,
            "precision": self.precision,
        }


def _parse(rec: dict[str, str]) -> Row:
    return Row(
        name=rec["row"],
        section=rec["table"],
        depth=int(rec["depth"]),
        stem=rec["stem"],
        dataset=rec["dataset"],
        recipe=rec["recipe"],
        precision=rec["precision"],
        num_classes=int(rec["num_classes"]),
        flops_input_px=int(rec["flops_input_px"]),
        pretrain=rec["pretrain"],
        params_m_table=float(rec["params_m_table"]),
        params_exact=int(rec["params_exact"]),
        flops_g_table=float(rec["flops_g_table"]),
        top1_table=float(rec["top1_table"]),
        top5_table=float(rec["top5_table"]) if rec["top5_table"] else None,
        checkpoint_url=rec["checkpoint_url"],
    )


@cache
def all_rows() -> tuple[Row, ...]:
    """Every row of the table, in the table's order."""
    text = resources.files("resnet_repro").joinpath("reference.csv").read_text()
    return tuple(_parse(rec) for rec in csv.DictReader(text.splitlines()))


@cache
def rows_by_name() -> dict[str, Row]:
    return {row.name: row for row in all_rows()}


def find_row(name: str) -> Row | None:
    """The row of that name, or None."""
    return rows_by_name().get(name)


def get_row(name: str) -> Row:
    row = find_row(name)
    if row is None:
        raise KeyError(f"unknown row {name!r}; rows: {', '.join(r.name for r in all_rows())}")
    return row


def match_row(choices: dict[str, str]) -> Row | None:
    """The table row composed by these group choices, or None for a custom composition."""
    wanted = {g: str(choices[g]) for g in GROUPS}
    return next((row for row in all_rows() if row.choices == wanted), None)


def composition_name(choices: dict[str, str]) -> str:
    """The row name, or `custom:<model>-<stem>-<dataset>-<recipe>-<precision>` off the table."""
    row = match_row(choices)
    if row is not None:
        return row.name
    return "custom:" + "-".join(str(choices[g]) for g in GROUPS)
