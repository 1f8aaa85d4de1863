"""The report's text: each section's table beside the published one, the re-tests, the runs behind the
numbers, the runs that do not count, the README preamble and runs.csv — all from the frame of
`select.runs_frame`, with links relative to the file they are written into (a run links to its record
file, results/logs/<row>/<run_id>.json, when it has one: nothing machine-specific)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from resnet_repro.report import markdown, select
from resnet_repro.report.markdown import DASH, fmt, fmt_diff
from resnet_repro.report.published import log_url
from resnet_repro.rows import SECTIONS, Row, all_rows, rows_by_name

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKS = "¹²³⁴⁵⁶⁷⁸⁹"
OTHER_RUNS = "other-runs.md"


@dataclass(frozen=True)
class Links:
    """How one Markdown file links out: relative paths from its folder."""

    where: Path  # the folder of the Markdown file
    out: Path  # the results folder: curves/, runs.csv
    records: Mapping[str, Path]  # run id -> its record file, for the runs that have one

    def rel(self, target: Path) -> str:
        return Path(os.path.relpath(target.resolve(), self.where.resolve())).as_posix()

    def config(self, row: Row) -> str:
        conf = REPO_ROOT / "conf" if (REPO_ROOT / "conf").is_dir() else Path("conf")  # editable install or cwd
        return self.rel(conf / "row" / f"{row.name}.yaml")

    def row_curves(self, row: Row) -> str:
        return self.rel(self.out / "curves" / f"{row.name}.png")

    def run_curves(self, run_id: str) -> str:
        return self.rel(self.out / "curves" / "runs" / f"{run_id}.png")

    def number(self, value: float, run_id: str) -> str:
        record = self.records.get(run_id)
        return f"[{value:.2f}]({self.rel(record)})" if record else f"{value:.2f}"

    def run(self, run_id: str) -> str:
        record = self.records.get(run_id)
        return f"[`{run_id}`]({self.rel(record)})" if record else f"`{run_id}`"


def has_top5(section: str) -> bool:
    """The seed's table has a Top-5 column for this section."""
    return any(r.top5_table is not None for r in all_rows() if r.section == section)


def _metrics(row: Row) -> list[tuple[str, str, float | None]]:
    """(name, frame column, published value) of the metrics the row's section shows."""
    top5 = [("Top-5", "top5", row.top5_table)] if has_top5(row.section) else []
    return [("Top-1", "top1", row.top1_table), *top5]


# ---- cells ------------------------------------------------------------------------------------
def reproduced(runs: pd.DataFrame, column: str, links: Links) -> str:
    """mean ± std (n: each run linked) over the runs that have the metric; one run: its number."""
    have = runs[runs[column].notna()]
    if have.empty:
        return DASH
    values = have[column].astype(float)
    if len(have) == 1:
        return links.number(float(values.iloc[0]), have["run_id"].iloc[0])
    each = ", ".join(links.number(v, r) for v, r in zip(values, have["run_id"], strict=True))
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f} (n={len(have)}: {each})"


def verdict_cell(runs: pd.DataFrame, column: str, published: float | None) -> str:
    word, delta = select.verdict(runs[column].dropna().astype(float).tolist(), published)
    return DASH if not word else word if word == "reproduced" else f"{word} (Δ {fmt_diff(delta)})"


def indicative_cell(runs: pd.DataFrame, links: Links) -> str:
    if runs.empty:
        return DASH
    labels = sorted({select.indicative_label(reason) for reason in runs["reason"]})
    return f"{reproduced(runs, 'top1', links)}; {'; '.join(labels)}"


def cost_cell(runs: pd.DataFrame) -> str:
    """Device-hours of the counting runs and the devices they ran on."""
    timed = runs[runs["device_hours"].notna()]
    if timed.empty:
        return DASH
    devices = sorted({f"{w}× {d}" for w, d in zip(timed["world_size"], timed["device"], strict=True)})
    return f"{timed['device_hours'].astype(float).sum():.2f} ({', '.join(devices)})"


def _note(notes: list[str], text: str) -> str:
    """Register a note under the table; returns its superscript mark."""
    if text not in notes:
        notes.append(text)
    return MARKS[notes.index(text) % len(MARKS)]


def _complexity(row: Row, runs: pd.DataFrame, notes: list[str]) -> tuple[str, str]:
    """Params (M) and Flops (G): measured by the runs when there are some, else the table's."""
    params = runs["params_n"].dropna().astype(float)
    flops = runs["flops_g"].dropna().astype(float)
    p_cell = fmt(params.iloc[0] / 1e6) if len(params) else fmt(row.params_m_table)
    f_cell = fmt(flops.iloc[0]) if len(flops) else fmt(row.flops_g_table)
    exact = row.params_exact / 1e6
    if not len(params) and abs(row.params_m_table - exact) > 0.01:  # a typo in the table (resnet34: 2.18)
        text = f"The published table prints {row.params_m_table:.2f} for `{row.name}`; the model has "
        p_cell += _note(notes, text + f"{row.params_exact:,} parameters ({exact:.2f} M).")
    return p_cell, f_cell


def _pretrain(row: Row, notes: list[str]) -> str:
    shown = row.pretrain.split(" (")[0]
    return shown if shown == row.pretrain else shown + _note(notes, f"`{row.name}` Pretrain: {row.pretrain}.")


def _download(row: Row) -> str:
    return f"[model]({row.checkpoint_url}) \\| [log]({log_url(row)})"


# ---- the section table ------------------------------------------------------------------------
def column_order(section: str) -> list[str]:
    names = ["Top-1", "Top-5"] if has_top5(section) else ["Top-1"]
    cols = ["Model", "Pretrain", "Params (M)", "Flops (G)"]
    for prefix, suffix in (("", " (%)"), ("Published ", " (%)"), ("Δ ", ""), ("Verdict ", "")):
        cols += [f"{prefix}{name}{suffix}" for name in names]
    return [*cols, "Indicative Top-1 (%)", "Device-hours", "Curves", "Config", "Download"]


def table_line(row: Row, frame: pd.DataFrame, links: Links, notes: list[str]) -> dict[str, str]:
    runs = select.of_row(frame, "train", row.name)
    params, flops = _complexity(row, runs, notes)
    line = {"Model": f"`{row.name}`", "Pretrain": _pretrain(row, notes), "Params (M)": params, "Flops (G)": flops}
    for name, column, published in _metrics(row):
        mean = runs[column].dropna().astype(float).mean() if runs[column].notna().any() else None
        line[f"{name} (%)"] = reproduced(runs, column, links)
        line[f"Published {name} (%)"] = fmt(published)
        line[f"Δ {name}"] = fmt_diff(None if mean is None or published is None else mean - published)
        line[f"Verdict {name}"] = verdict_cell(runs, column, published)
    line["Indicative Top-1 (%)"] = indicative_cell(select.of_row(frame, "train", row.name, "indicative"), links)
    line["Device-hours"] = cost_cell(runs)
    line["Curves"] = f"[curves]({links.row_curves(row)})" if len(runs) else DASH
    line["Config"] = f"[config]({links.config(row)})"
    line["Download"] = _download(row)
    return line


def _checkpoint(row: Row, run: pd.Series) -> str:
    """`published`, or the file name and the training run that wrote it (no machine-specific folder)."""
    ckpt = str(run["checkpoint"] or "")
    if ckpt == row.checkpoint_url:
        return "`published`"
    name = f"`{Path(ckpt).name}`" if ckpt else DASH
    return f"{name} of run `{run['source_run_id']}`" if run["source_run_id"] else name


def retest_table(section: str, frame: pd.DataFrame, links: Links) -> str:
    """Counting evaluation runs of this section's rows: a checkpoint's Top-1 beside the published one."""
    lines = []
    for row in (r for r in all_rows() if r.section == section):
        for _, run in select.of_row(frame, "eval", row.name).iterrows():
            line = {
                "Model": f"`{row.name}`",
                "Checkpoint": _checkpoint(row, run),
                "Checkpoint re-test Top-1 (%)": links.number(float(run["top1"]), run["run_id"]),
                "Published Top-1 (%)": fmt(row.top1_table),
                "Δ Top-1": fmt_diff(float(run["top1"]) - row.top1_table),
            }
            if has_top5(section):
                line["Checkpoint re-test Top-5 (%)"] = fmt(run["top5"])
                line["Published Top-5 (%)"] = fmt(row.top5_table)
            lines.append(line)
    return markdown.table(pd.DataFrame(lines)) if lines else ""


def not_counting_table(section: str, frame: pd.DataFrame, links: Links) -> str:
    """Training runs of this section's rows that neither count nor are indicative, with why."""
    lines = []
    for row in (r for r in all_rows() if r.section == section):
        runs = frame[(frame["run_type"] == "train") & (frame["row"] == row.name)]
        runs = runs[~runs["counts"].astype(bool) & ~runs["indicative"].astype(bool) & runs["top1"].notna()]
        for _, run in runs.iterrows():
            line = {
                "Model": f"`{row.name}`",
                "Top-1 (%)": fmt(run["top1"]),
                "Published Top-1 (%)": fmt(row.top1_table),
                "Δ Top-1": fmt_diff(float(run["top1"]) - row.top1_table),
            }
            if has_top5(section):
                line["Top-5 (%)"] = fmt(run["top5"])
            line |= {"Why it does not count": run["reason"], "Run": links.run(run["run_id"])}
            lines.append({**line, "Curves": f"[curves]({links.run_curves(run['run_id'])})"})
    return markdown.table(pd.DataFrame(lines)) if lines else ""


def _run_item(run: pd.Series, links: Links) -> str:
    parts = [links.run(run["run_id"]), run["run_type"], f"`{run['row']}`"]
    if run["run_type"] == "train":
        parts += [f"seed {run['seed']}", f"{run['recipe_epochs']} epochs"]
    else:
        parts += [f"checkpoint `{Path(str(run['checkpoint'])).name or DASH}`"]
    parts += [f"top-1 {fmt(run['top1'])}", f"top-5 {fmt(run['top5'])}"]
    if pd.notna(run["device_hours"]):
        parts += [f"{run['device_hours']:.2f} device-hours on {run['world_size']}× {run['device']}"]
    parts += [f"indicative: {select.indicative_label(run['reason'])}"] if run["indicative"] else []
    parts += [f"config `{run['config_hash']}`"] if run["config_hash"] else []
    parts += [f"[curves]({links.run_curves(run['run_id'])})"] if run["has_curves"] else []
    return "- " + " · ".join(parts + [f"started {run['start_time']}"])


def section_markdown(section: str, frame: pd.DataFrame, links: Links, level: str, with_others: bool = False) -> str:
    """A section's table; `with_others` (results/<section>.md, not the README) adds the runs that do not count."""
    notes: list[str] = []
    rows = [r for r in all_rows() if r.section == section]
    table = pd.DataFrame([table_line(r, frame, links, notes) for r in rows], columns=column_order(section))
    parts = [f"{level} Image Classification on {section}", markdown.table(table)]
    if notes:
        parts.append("\n".join(f"{MARKS[i % len(MARKS)]} {text}  " for i, text in enumerate(notes)).rstrip())
    retest = retest_table(section, frame, links)
    if retest:
        parts += [f"Checkpoint re-tests on {section} (`python -m resnet_repro.test`):", retest]
    mine = frame[frame["row"].isin({r.name for r in rows})]
    shown = mine[mine["counts"].astype(bool) | mine["indicative"].astype(bool)]
    if len(shown):
        parts += ["Runs behind these numbers:", "\n".join(_run_item(run, links) for _, run in shown.iterrows())]
    others = not_counting_table(section, frame, links) if with_others else ""
    if others:
        parts += [f"Runs on {section} that do not count:", others]
    return "\n\n".join(parts) + "\n"


def section_slug(section: str) -> str:
    return section.lower()


# ---- runs of no table row ---------------------------------------------------------------------
def other_runs_markdown(frame: pd.DataFrame, links: Links) -> str:
    """Runs of custom compositions (demo data, other depths or recipes) or of no row: results/other-runs.md."""
    runs = frame[~frame["row"].isin(rows_by_name())]
    head = "# Other runs (custom compositions, demo data, runs of no table row)"
    if runs.empty:
        return f"{head}\n\nNone.\n"
    lines = [
        {
            "Run": links.run(run["run_id"]),
            "Row": f"`{run['row'] or DASH}`",
            "Type": run["run_type"] or DASH,
            "Status": run["status"],
            "Epochs": f"{run['epochs']} of {run['recipe_epochs']}" if run["epochs"] != "" else DASH,
            "Top-1 (%)": fmt(run["top1"]),
            "Top-5 (%)": fmt(run["top5"]),
            "Why it does not count": run["reason"],
            "Curves": f"[curves]({links.run_curves(run['run_id'])})" if run["has_curves"] else DASH,
        }
        for _, run in runs.iterrows()
    ]
    return f"{head}\n\n{markdown.table(pd.DataFrame(lines))}\n"


# ---- README preamble and CSV ------------------------------------------------------------------
def preamble(frame: pd.DataFrame, links: Links, experiment: str) -> str:
    train = frame[frame["run_type"] == "train"]
    counted, indicative = int(train["counts"].astype(bool).sum()), int(train["indicative"].astype(bool).sum())
    return (
        f"Generated by `python -m resnet_repro.report` from MLflow experiment `{experiment}` (the store and the "
        f"run records in `{links.rel(links.out / 'logs')}/`): {counted} of {len(train)} training runs count "
        f"(finished, faithful to the row's recipe and data, full length), {indicative} indicative; every run and "
        f"why it does or does not count: [runs.csv]({links.rel(links.out / 'runs.csv')}); runs of no table row: "
        f"[{OTHER_RUNS}]({links.rel(links.out / OTHER_RUNS)}). Top-1/Top-5: this project's runs (last epoch; "
        "mean ± std over seeds, each run linked to its record); Δ = reproduced − published; verdict: "
        "`reproduced` when |mean Δ| ≤ max(0.3, 2 × std over seeds); Indicative: full-length runs that only their "
        "data keeps from counting; Device-hours: Σ epoch time × world size of the counting runs; — = no "
        "counting run yet.\n"
    )


def runs_csv(frame: pd.DataFrame) -> bytes:
    out = frame[select.CSV_COLUMNS].copy()
    for flag in ("counts", "indicative"):
        out[flag] = out[flag].map(lambda c: "yes" if c else "no")
    return out.to_csv(index=False, lineterminator="\n", float_format="%.4f").encode()


def readme_section(frame: pd.DataFrame, links: Links, experiment: str) -> str:
    return "\n".join(
        [preamble(frame, links, experiment), *(section_markdown(s, frame, links, "###") for s in SECTIONS)]
    )
