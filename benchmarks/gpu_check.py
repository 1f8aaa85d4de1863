"""The device check's driver: every stage in its own process under a time limit, within one total budget.

    python -m benchmarks.gpu_check [--device cuda] [--data .devcheck/cifar10-jpeg.tar.gz] [--out gpu-results]
    python -m benchmarks.gpu_check --device cpu --tiny --data <tiny JPEG folder or .tar.gz> --out tmp-results

(benchmarks/gpu_check.sh installs the carried wheels first, then runs this.) Stages, in order of value:
smoke (every row family a few steps, the first against the CPU), train_step (trainer step vs a plain loop),
row_times (each CIFAR row's projected full recipe), input_pipeline (issue 16's decode benchmark, when
present), epoch (real resnet18_8xb16_cifar10 epochs on the JPEG copy, as many as the time left allows).
A stage that crashes or runs past its limit loses itself only; a stage is skipped when the budget is
nearly spent. Results: `results.jsonl` (every stage's JSON lines), `summary.md` (one table per stage, each
failed stage's last log lines) and `stages.log` (every stage's output), in --out.

Standard library only: the driver must run where the stages' imports fail.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESERVE_S = 10.0  # kept back for the summary
LOG_TAIL = 15  # log lines shown in summary.md for a failed stage
HIDDEN = ("stage", "device", "torch")  # shown once per stage, not in every row


@dataclass
class Stage:
    name: str
    what: str
    share_s: float | None  # most seconds it may take; None = whatever is left
    min_s: float  # fewer seconds left than this: skipped
    command: Callable[[Context, float], list[str] | str]  # argv, or the reason it cannot run


@dataclass
class Context:
    device: str
    tiny: bool
    results: Path
    source: str | None  # --data: the JPEG copy's archive or folder
    scratch: Path  # where the archive is extracted
    python: str = sys.executable
    _root: Path | str | None = None

    def data(self) -> Path | str:
        """The image folder root (extracted on first use: only stages that read it pay); a reason if none."""
        if self._root is None:
            try:
                self._root = prepare_data(self.source, self.scratch)
            except (OSError, tarfile.TarError, ValueError) as err:
                self._root = f"--data {self.source}: {err}"
        return self._root


def module_command(module: str, *args: str, data: bool = False) -> Callable[[Context, float], list[str] | str]:
    """`python -m benchmarks.<module> --device D --json FILE --max-seconds S [--tiny] [--data DIR] args`."""

    def build(ctx: Context, soft_s: float) -> list[str] | str:
        root = ctx.data() if data else None
        if isinstance(root, str):
            return root
        argv = [ctx.python, "-m", f"benchmarks.{module}", "--device", ctx.device, "--json", str(ctx.results)]
        argv += ["--max-seconds", f"{soft_s:.0f}", *(["--tiny"] if ctx.tiny else [])]
        return argv + (["--data", str(root)] if root else []) + list(args)

    return build


def input_pipeline(ctx: Context, soft_s: float) -> list[str] | str:
    """Issue 16's benchmark when this checkout has it; only the options its source names are passed."""
    script = REPO / "benchmarks" / "input_pipeline.py"
    if not script.is_file():
        return "benchmarks/input_pipeline.py is not in this checkout (issue 16)"
    source = script.read_text()
    soft_s = min(soft_s, 25.0) if ctx.tiny else soft_s  # it measures for as long as it is given
    argv = [ctx.python, "-m", "benchmarks.input_pipeline", "--device", ctx.device, "--json", str(ctx.results)]
    argv += ["--max-seconds", f"{soft_s:.0f}", *(["--tiny"] if ctx.tiny and '"--tiny"' in source else [])]
    root = ctx.data() if '"--data"' in source else None
    return argv + (["--data", str(root)] if isinstance(root, Path) else [])


STAGES = [
    Stage("smoke", "every row family on the device, first step against the CPU", 260, 40, module_command("smoke")),
    Stage("train_step", "trainer step vs a plain loop, same process", 55, 25, module_command("train_step")),
    Stage("row_times", "each CIFAR row's full recipe, projected from its step", 45, 25, module_command("row_times")),
    Stage("input_pipeline", "JPEG decoding and the input pipeline (issue 16)", 40, 20, input_pipeline),
    Stage("epoch", "real resnet18_8xb16_cifar10 epochs on the JPEG copy", None, 60, module_command("epoch", data=True)),
]


# ---- running ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    stage: str
    status: str  # ok | cases failed | failed | timed out | no results | skipped | out of time (not started)
    seconds: float
    note: str = ""
    log: str = ""


def run_stage(argv: Sequence[str], limit_s: float, log: Path, env: dict[str, str] | None = None) -> tuple[int, bool]:
    """Run argv in its own process group, output to `log`; killed (TERM, then KILL) after limit_s.
    (exit status, timed out)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            list(argv), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind (data-loader workers)
            return rc, False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the stage and its data-loader workers: a chance to end
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            return (proc.returncode if proc.returncode is not None else -9), True


def tail(text: str, n: int = LOG_TAIL) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def run_check(
    stages: Sequence[Stage], ctx: Context, out: Path, budget_s: float, started: float, env: dict[str, str] | None = None
) -> list[Outcome]:
    """Every stage in turn within `budget_s` seconds counted from `started` (time.time()); a driver line in
    results.jsonl for each stage that did not run or did not end well."""
    outcomes = []
    for stage in stages:
        left = budget_s - (time.time() - started) - RESERVE_S
        limit = left if stage.share_s is None else min(stage.share_s, left)
        grace = min(30.0, 0.25 * limit)  # imports and the case in flight, between the stage's soft limit and ours
        argv = stage.command(ctx, max(1.0, limit - grace)) if limit >= stage.min_s else None
        if argv is None:
            reason = f"{max(0.0, left):.0f} s left of the {budget_s:.0f} s budget (needs {stage.min_s:.0f})"
            outcome = _record(ctx, Outcome(stage.name, "out of time", 0.0, reason))
        elif isinstance(argv, str):
            outcome = _record(ctx, Outcome(stage.name, "skipped", 0.0, argv))
        else:
            print(f"== {stage.name}: {stage.what} (at most {limit:.0f} s)", flush=True)
            outcome = run_one(stage.name, argv, limit, ctx.results, out / "stages.log", env)
            if outcome.status in ("timed out", "failed"):
                _record(ctx, outcome)
        outcomes.append(outcome)
        print(f"   {outcome.status}, {outcome.seconds:.0f} s{': ' + outcome.note if outcome.note else ''}", flush=True)
    return outcomes


def run_one(
    name: str, argv: Sequence[str], limit: float, results: Path, stage_log: Path, env: dict[str, str] | None
) -> Outcome:
    """One stage's process; its output appended to stage_log; its JSON lines counted (and named, if not)."""
    offset = results.stat().st_size
    t0 = time.time()
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        rc, timed_out = run_stage(argv, limit, Path(log.name), env)
        text = Path(log.name).read_text(errors="replace")
    seconds = time.time() - t0
    with open(stage_log, "a") as f:
        f.write(f"===== {name} ({seconds:.0f} s, exit {rc}): {' '.join(argv)}\n{text}\n")
    status = [line.get("status") for line in _adopt_lines(results, offset, name)]
    if timed_out:
        return Outcome(name, "timed out", seconds, f"killed after {limit:.0f} s", tail(text))
    if rc != 0:
        return Outcome(name, "failed", seconds, f"exit {rc}: {(tail(text, 1) or 'no output')[:200]}", tail(text))
    if not status:
        return Outcome(name, "no results", seconds, "it wrote no JSON line", tail(text))
    counts = {s: status.count(s) for s in ("ok", "fail", "skipped") if s in status}
    note = ", ".join(f"{n} {'failed' if s == 'fail' else s}" for s, n in counts.items())
    return Outcome(name, "cases failed" if "fail" in counts else "ok", seconds, note)


def _adopt_lines(results: Path, offset: int, stage: str) -> list[dict]:
    """The lines a stage appended; those without a "stage" key (a script with its own format) get its name."""
    with open(results, "r+") as f:
        f.seek(offset)
        lines = [json.loads(t) for t in f.read().splitlines() if _is_json(t)]
        if any("stage" not in line for line in lines):
            f.seek(offset)
            f.truncate()
            f.writelines(json.dumps({"stage": stage, **line}) + "\n" for line in lines)
    return lines


def _is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:  # a stage killed while writing
        return False


def _record(ctx: Context, outcome: Outcome) -> Outcome:
    line = {"stage": outcome.stage, "case": "(stage)", "status": outcome.status, "reason": outcome.note}
    with open(ctx.results, "a") as f:
        f.write(json.dumps(line) + "\n")
    return outcome


# ---- data ---------------------------------------------------------------------------------------------
def prepare_data(data: str | None, scratch: Path) -> Path:
    """The image folder root (with train/ and test/): the folder given, or the archive extracted into scratch."""
    if not data:
        raise ValueError("no data given; pass --data (the CIFAR-10 JPEG copy: its .tar.gz or extracted folder)")
    path = Path(data)
    if path.is_file():
        with tarfile.open(path) as archive:
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # no links or paths out of scratch
            archive.extractall(scratch, **extra)
        path = scratch
    if not path.is_dir():
        raise ValueError("no such file or folder; give the CIFAR-10 JPEG .tar.gz or its extracted folder")
    for root in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    raise ValueError("no train/ and test/ folders in it (an image-folder copy of CIFAR-10)")


# ---- the summary --------------------------------------------------------------------------------------
def read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(t) for t in path.read_text().splitlines() if _is_json(t)]


def cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict]) -> str:
    """One Markdown table of JSON lines: the union of their keys (first seen first) as columns."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in HIDDEN and k not in columns]
    head = f"| {' | '.join(columns)} |\n|{'|'.join(' --- ' for _ in columns)}|\n"
    return head + "".join(f"| {' | '.join(cell(r.get(c)) for c in columns)} |\n" for r in rows)


def render_summary(outcomes: Sequence[Outcome], lines: Sequence[dict], header: str, budget_s: float) -> str:
    """summary.md: the stages' outcomes, one table per stage (device and torch in its heading), failed logs."""
    total = sum(o.seconds for o in outcomes)
    table = [{"name": o.stage, "status": o.status, "seconds": round(o.seconds), "note": o.note} for o in outcomes]
    parts = [header, f"Stages ({total:.0f} s of the {budget_s:.0f} s budget):\n", markdown_table(table)]
    for o in outcomes:
        own = [line for line in lines if line.get("stage") == o.stage and line.get("case") != "(stage)"]
        where = next((f" — {line['device']}, torch {line['torch']}" for line in own if "device" in line), "")
        parts.append(f"\n## {o.stage}{where}\n")
        parts.append(markdown_table(own) if own else "(no results)\n")
        if o.log:
            parts.append(f"\nLast lines of its log ({o.status}):\n\n```\n{o.log}\n```\n")
    return "\n".join(parts)


def environment(device: str, tiny: bool) -> str:
    smi = shutil.which("nvidia-smi") if device == "cuda" else None
    gpu = ""
    if smi:
        query = [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        try:
            gpu = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            gpu = "nvidia-smi did not answer"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        f"# Device check ({device}{', tiny sizes' if tiny else ''})\n\n"
        f"{when}; commit {commit.stdout.strip() or 'unknown'}; Python {sys.version.split()[0]}"
        f"{'; GPU: ' + gpu if gpu else ''}\n"
    )


# ---- the command line ---------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, stages: Sequence[Stage] = STAGES) -> int:
    parser = argparse.ArgumentParser(
        "benchmarks/gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the stages run")
    parser.add_argument(
        "--out",
        default=os.environ.get("GPU_CHECK_OUT", "gpu-results"),
        help="results folder (default $GPU_CHECK_OUT or ./gpu-results); its earlier results are replaced",
    )
    carried = REPO / ".devcheck" / "cifar10-jpeg.tar.gz"  # where gpu_check.sh --prepare puts it
    parser.add_argument(
        "--data",
        default=str(carried) if carried.is_file() else None,
        help="the CIFAR-10 JPEG copy: a .tar.gz or an extracted folder (default .devcheck/cifar10-jpeg.tar.gz)",
    )
    parser.add_argument("--tiny", action="store_true", help="every stage at test sizes (the CPU test of the check)")
    parser.add_argument(
        "--budget",
        type=float,
        default=520.0,
        help="seconds for the whole check, counted from $GPU_CHECK_T0 (the shell script's start) or now",
    )
    parser.add_argument(
        "--stages",
        default=None,
        help=f"comma-separated stages to run (default: all) of {', '.join(s.name for s in stages)}",
    )
    args = parser.parse_args(argv)
    started = float(os.environ.get("GPU_CHECK_T0") or time.time())
    chosen = args.stages.split(",") if args.stages else [s.name for s in stages]
    unknown = set(chosen) - {s.name for s in stages}
    if unknown:
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))}; allowed: {', '.join(s.name for s in stages)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.jsonl", "summary.md", "stages.log"):
        (out / name).unlink(missing_ok=True)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # this checkout first
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    if args.data and not Path(args.data).exists():
        parser.error(f"--data {args.data}: no such file or folder; give the CIFAR-10 JPEG .tar.gz or its folder")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        ctx = Context(args.device, args.tiny, out / "results.jsonl", args.data, Path(scratch))
        ctx.results.touch()
        outcomes = run_check([s for s in stages if s.name in chosen], ctx, out, args.budget, started, env)
    summary = render_summary(outcomes, read_lines(ctx.results), environment(args.device, args.tiny), args.budget)
    (out / "summary.md").write_text(summary)
    print(f"\n{summary}\nresults in {out}: summary.md, results.jsonl, stages.log", flush=True)
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1  # the summary says which


if __name__ == "__main__":
    sys.exit(main())
