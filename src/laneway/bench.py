"""`laneway bench`: what the gateway adds on top of the model, measured against a direct call
and a bare pass-through (issue 6). The harness lives in the repository's `benchmarks/`, which
this command finds from a source checkout; the results table is printed and written as JSON
(and Markdown) next to each other.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

_TARGETS = "direct,bare,laneway,laneway-pg-redis,litellm"
_PHASES = "matrix,handoff,history,stored,rss"


def register(app: typer.Typer) -> None:
    app.command(name="bench")(bench)


def bench(
    full: Annotated[
        bool, typer.Option("--full/--quick", help="Full run (~10 min) or quick (~1 min).")
    ] = False,
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Rounds (default: 5 full, 2 quick).")
    ] = None,
    targets: Annotated[str, typer.Option(help="Comma-separated targets.")] = _TARGETS,
    only: Annotated[str, typer.Option(help="Comma-separated phases.")] = _PHASES,
    json_path: Annotated[
        Path, typer.Option("--json", help="Results file; a .md table goes next to it.")
    ] = Path("laneway-bench.json"),
    profile: Annotated[
        bool, typer.Option(help="Also profile each laneway target under load with py-spy.")
    ] = False,
    laneway_src: Annotated[
        Path | None,
        typer.Option(help="Run the laneway targets from this src/ directory (compare versions)."),
    ] = None,
    base_src: Annotated[
        Path | None,
        typer.Option(help="Also run target laneway-base (or the -base targets named in "
                     "--targets) from this src/ directory, in the same rounds: a change "
                     "measured against its base under the same noise."),
    ] = None,
    scale: Annotated[float, typer.Option(hidden=True, min=0.01)] = 1.0,
) -> None:
    """Benchmark laneway against a direct call and a bare pass-through."""
    console = Console() if sys.stdout.isatty() else Console(width=150)  # logs: no wrapping
    runner, stats = _harness()
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if base_src is not None and not any(name.endswith("-base") for name in names):
        names.insert(names.index("laneway") + 1 if "laneway" in names else len(names),
                     "laneway-base")
    try:
        plan = runner.plan(
            "full" if full else "quick",
            rounds=rounds,
            targets=tuple(names),
            only=tuple(p.strip() for p in only.split(",") if p.strip()),
            profile=profile,
            scale=scale,
        )
    except ValueError as e:
        console.print(f"laneway bench: {e}", style="red", markup=False)
        raise typer.Exit(2) from None
    json_path = json_path.resolve()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    profile_out = json_path if profile else None  # profiles go next to it
    previous = signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        with runner.Bench(plan, laneway_src=laneway_src, base_src=base_src,
                          profile_out=profile_out) as b:
            steps = b.steps()
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn())
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task("starting", total=len(steps))
                for step in steps:
                    progress.update(task, description=step.label)
                    step.run()
                    progress.advance(task)
            result = b.result()
    except KeyboardInterrupt:
        console.print("interrupted: every process the run started is stopped", style="yellow")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    result["meta"]["command"] = "laneway " + " ".join(sys.argv[1:])
    json_path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    json_path.with_suffix(".md").write_text(stats.markdown(result))
    _show(console, result, stats)
    console.print(f"{time.monotonic() - started:.0f} s; results in {json_path} "
                  f"(and {json_path.with_suffix('.md').name})", soft_wrap=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _harness() -> tuple[Any, Any]:
    """The `benchmarks` package of the source checkout this laneway runs from (or of the
    current directory)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "benchmarks" / "runner.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            from benchmarks import runner, stats

            return runner, stats
    raise typer.BadParameter(
        "the benchmark harness (benchmarks/) is not here: run `laneway bench` from a source "
        "checkout of laneway"
    )


def _show(console: Console, result: dict[str, Any], stats: Any) -> None:
    meta = result["meta"]
    targets, rows = stats.main_rows(result)
    table = Table(title=f"laneway bench · {meta['mode']} · {meta['rounds']} rounds · "
                        f"{meta['nproc']} × {meta['cpu']} · Python {meta['python']}",
                  caption="medians over rounds of per-round figures paired with direct; "
                          "(…) = direct's absolute value")
    table.add_column("")
    for target in targets:
        table.add_column(target, justify="right")
    for label, values in rows:
        table.add_row(label, *(values[t] for t in targets))
    console.print(table if rows else table.title)  # no matrix, hand-off or RSS: the title
    for target in result.get("scale", {}):
        title = stats.SCALE_TITLES.get(target, target)
        scale = Table(title=f"{title}: cost against history length and store size")
        for name in ("", "a", "b", "b / a"):
            scale.add_column(name, justify="left" if not name else "right")
        for label, v in stats.scale_rows(result, target):
            scale.add_row(label, v["a"], v["b"], v["ratio"])
        console.print(scale)
    versus = stats.base_rows(result)
    if versus:
        base = Table(title=f"laneway vs laneway-base ({meta['base_src']}), paired per round")
        for name in ("", "base", "laneway", "ratio"):
            base.add_column(name, justify="left" if not name else "right")
        for label, v in versus:
            base.add_row(label, v["a"], v["b"], v["ratio"])
        console.print(base)
    for target, prof in result.get("profile", {}).items():
        if not isinstance(prof, dict) or not prof.get("top_self"):
            continue
        top = Table(title=f"py-spy, {target} under load: top self time "
                          f"({prof['samples']} samples, all in {prof['file']})")
        top.add_column("function")
        top.add_column("%", justify="right")
        for entry in prof["top_self"][:15]:
            top.add_row(entry["function"], f"{entry['percent']:.1f}")
        console.print(top)
    for target, status in meta["targets"].items():
        if status != "ok":
            console.print(f"{target}: left out — {status}", style="yellow", markup=False)
    if result["errors"]:
        console.print(f"{result['errors']} requests failed; see first_error in the JSON",
                      style="red")
