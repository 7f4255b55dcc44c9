"""`foresight-report`: tables and plots from results files, and the README's results rebuilt from them.

    foresight-report                                   # rewrite the README's report blocks
    foresight-report sweep outputs/robustness/<date>   # a sweep's heatmap (png, pdf), table (md), numbers (json)
    foresight-report save main_job outputs/main_job2   # keep a run's numbers: experiments/results/main_job.json
    foresight-report save robustness outputs/robustness/<date>   # ... or a whole sweep's
    foresight-report save horizon outputs/horizon/<date>         # ... or foresight-horizon's horizon.json
    foresight-report save score outputs/score/<date>             # ... or foresight-score's results.json

The robustness sweep is a hydra multirun of foresight-control (configs/sweep/robustness.yaml, which
also says how to run it on a Ray cluster): `foresight-control -m +sweep=robustness`. Each job's
results.json records its env config, from which its condition is read.

README blocks: the lines between `<!-- report:NAME -->` and `<!-- /report:NAME -->` are replaced
by the renderer for experiments/results/NAME.json's `kind` (RENDERERS: data -> markdown). The results
files live in the repository, so a clean clone rebuilds every such number. Another kind of result:
write a renderer, register it, and give `save` a way to recognise the file.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from experiments.common import atomic_write, clean_errors, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
BLOCK = re.compile(r"<!-- report:(\S+) -->\n.*?<!-- /report:\1 -->", re.S)


# ---------------------------------------------------------------- cells and tables
def pct(x: float, short: bool = True) -> str:
    """A fraction in %, one decimal; `short` drops a trailing .0 (28%, not 28.0%)."""
    text = f"{100 * x:.1f}"
    return text.removesuffix(".0") if short else text


def cell(r: dict, counts: bool = True) -> str:
    """A success summary as `k/n (p%) [lo, hi]` (95% Wilson interval, in %); `p% [lo, hi]` without counts."""
    lo, hi = r["ci95"]
    ci = f"[{pct(lo, short=lo == 0)}, {pct(hi, short=hi == 1)}]"
    return (f"{r['successes']}/{r['episodes']} ({pct(r['success_rate'])}%) " if counts
            else f"{pct(r['success_rate'], short=False)}% ") + ci


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(map(str, row)) + " |" for row in [headers, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(headers), *lines[1:]])


def overall(per_family: dict) -> dict:
    """A mode's summary over all its families (control writes `all` when there are several)."""
    return per_family.get("all") or next(iter(per_family.values()))


def command(run_dir: Path, multirun: bool = False, program: str = "foresight-control") -> str | None:
    """The command line that made a run (or sweep), from what hydra saved."""
    path = run_dir / "multirun.yaml" if multirun else run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    overrides = OmegaConf.load(path)
    overrides = overrides.hydra.overrides.task if multirun else overrides
    return shlex.join([program, *(["-m"] if multirun else []), *overrides])


# ---------------------------------------------------------------- a sweep
def condition(env: dict) -> tuple[str, tuple]:
    """A job's condition, read from its recorded env config: its label and its place in the table."""
    strengths = env.get("perturbations") or {}
    on = [(axis, s) for axis, s in strengths.items() if s]
    heldout = env.get("instruction_split") == "heldout"
    parts = ["heldout"] * heldout + [f"{axis} {s:g}" for axis, s in on]
    order = [-1] * heldout + [list(strengths).index(axis) for axis, _ in on]
    return " + ".join(parts) or "baseline", (len(parts), order, [s for _, s in on])


def collect(sweep_dir: str | Path) -> dict:
    """Every job's results.json under a sweep (multirun) directory, as condition x mode cells."""
    sweep_dir = Path(sweep_dir)
    files = sorted(sweep_dir.rglob("results.json"),  # job 2 before job 10
                   key=lambda p: [(not s.isdigit(), int(s) if s.isdigit() else 0, s) for s in p.parts])
    if not files:
        raise FileNotFoundError(f"no results.json under {sweep_dir}: is it a foresight-control sweep "
                                f"(multirun) directory, and has a job finished?")
    for hydra_dir in sweep_dir.rglob(".hydra"):
        if not (hydra_dir.parent / "results.json").is_file():
            print(f"warning: {hydra_dir.parent} has no results.json (failed or unfinished job)", file=sys.stderr)
    cells, keys, modes, runs, first, families = {}, {}, [], [], None, None
    for path in files:
        data = json.loads(path.read_text())
        if "results" not in data or "env" not in data:
            raise ValueError(f"{path} is not a foresight-control results.json")
        first = data["first_seed"] if first is None else first
        if data["first_seed"] != first:
            raise ValueError(f"the sweep is not paired: {path} starts at seed {data['first_seed']}, others at {first}")
        label, keys[label] = condition(data["env"])
        for mode, per in data["results"].items():
            if mode in cells.setdefault(label, {}):
                raise ValueError(f"two jobs ran {mode} under {label}; the second is {path}")
            families = families or list(per)
            if list(per) != families:
                raise ValueError(f"the sweep is not paired: {path} ran {list(per)}, others {families}")
            cells[label][mode] = per
            modes += [mode] * (mode not in modes)
        runs.append({"dir": str(path.parent), "condition": label, "modes": list(data["results"]),
                     "command": command(path.parent)})
    return {"kind": "robustness", "command": command(sweep_dir, multirun=True), "first_seed": first,
            "conditions": sorted(cells, key=keys.get), "modes": modes, "families": families,
            "cells": cells, "runs": runs}


def heatmap(data: dict, stem: Path) -> list[Path]:
    """Success (%) of every condition x mode, over all families: stem.png and stem.pdf."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conds, modes = data["conditions"], data["modes"]
    rate = np.array([[100 * overall(data["cells"][c][m])["success_rate"] if m in data["cells"][c] else np.nan
                      for m in modes] for c in conds])
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(modes), 1.0 + 0.4 * len(conds)))
    image = ax.imshow(rate, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(rate):
        ax.text(j, i, "—" if np.isnan(v) else f"{v:.0f}%", ha="center", va="center", fontsize=9,
                color="white" if v < 20 or v > 85 else "black")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_yticks(range(len(conds)), conds)
    ax.xaxis.tick_top()
    n = overall(data["cells"][conds[0]][modes[0]])["episodes"] if modes[0] in data["cells"][conds[0]] else "?"
    ax.set_xlabel(f"success (%): {', '.join(f for f in data['families'] if f != 'all')}; {n} episodes a cell")
    fig.colorbar(image, ax=ax)
    paths = [atomic_write(stem.with_suffix(f".{fmt}"), lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=150,
                                                                                  bbox_inches="tight"))
             for fmt in ("png", "pdf")]
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- renderers: results file -> markdown
def render_control(data: dict) -> str:
    """foresight-control's results.json: one row per mode, a column per family, then planning cost."""
    results = data["results"]
    families = [f for f in next(iter(results.values())) if f != "all"]
    rows = [[mode, *(cell(per[f]) for f in families), *([cell(per["all"], counts=False)] if "all" in per else []),
             f"{overall(per)['plan_ms_median']:.1f} ({overall(per)['plan_ms_p95']:.1f})",
             f"{overall(per)['evaluations_per_replan']:.0f}"] for mode, per in results.items()]
    all_col = ["all"] if len(families) > 1 else []
    return md_table(["mode", *families, *all_col, "plan ms median (p95)", "rollouts/plan"], rows)


def render_robustness(data: dict) -> str:
    """A sweep: one row per condition; a column per mode (over all families), or, for one mode, per family."""
    cells, modes, families = data["cells"], data["modes"], [f for f in data["families"] if f != "all"]
    if len(modes) == 1:
        cols = families + ["all"] * (len(families) > 1)
        rows = [[c, *(cell(cells[c][modes[0]][f], counts=f != "all") for f in cols)] for c in data["conditions"]]
        return md_table(["condition", *cols], rows)
    rows = [[c, *(cell(overall(cells[c][m])) if m in cells[c] else "—" for m in modes)] for c in data["conditions"]]
    return md_table(["condition", *modes], rows)


OPEN_LOOP_HORIZONS = (1, 2, 4, 8, 16)  # chunks; the README's columns (horizon.json has every one)


def render_horizon(data: dict) -> str:
    """foresight-horizon: per variant, the probe's error on real latents, then at a few horizons h (chunks)
    `error ratio to copy-last / probe error on imagined latents` (% of the table width); then, if it
    ran, closed-loop vla_cem success per line and planning horizon H."""
    variants = data["open_loop"]["variants"]
    hs = [h for h in OPEN_LOOP_HORIZONS if h <= len(next(iter(variants.values()))["rollout"])]
    rows = [[name, f"{pct(v['probe']['real_error_of_table_width'], short=False)}%",
             *(f"{v['rollout'][h - 1]['ratio']:.2f} / {pct(v['probe']['imagined'][h - 1]['mean_error_of_table_width'], short=False)}%"
               for h in hs)] for name, v in variants.items()]
    text = md_table(["world model", "probe, real latents", *(f"h = {h}" for h in hs)], rows)
    if "closed_loop" in data:
        lines = data["closed_loop"]["lines"]
        horizons = [r["H"] for r in next(iter(lines.values()))["horizons"]]
        rows = [[name, *(cell(r) for r in line["horizons"])] for name, line in lines.items()]
        text += "\n\n" + md_table(["vla_cem, line", *(f"H = {h}" for h in horizons)], rows)
    return text


def render_score(data: dict) -> str:
    """foresight-score's results.json: what was scored, then AUROC, its 95% interval and Spearman per scorer."""
    from experiments.score import report  # the command's own table (it imports torch: only when asked)
    return report(data)


RENDERERS = {"control": render_control, "robustness": render_robustness, "horizon": render_horizon,
             "score": render_score}


def render(data: dict, name: str) -> str:
    kind = data.get("kind", "control" if "planner" in data else None)
    if kind not in RENDERERS:
        raise ValueError(f"{name}: no renderer for kind {kind!r} (known: {', '.join(RENDERERS)})")
    return RENDERERS[kind](data)


# ---------------------------------------------------------------- commands
def rewrite_readme(readme: Path, results: Path) -> list[str]:
    """Replace every report block in the README with its rendered results file (atomically)."""
    text = readme.read_text()
    names = re.findall(r"<!-- report:(\S+) -->", text)
    if not names:
        raise ValueError(f"{readme} has no `<!-- report:NAME -->` … `<!-- /report:NAME -->` blocks")
    closed = BLOCK.findall(text)
    for name in names:
        if name not in closed:
            raise ValueError(f"{readme}: `<!-- report:{name} -->` has no `<!-- /report:{name} -->` after it")

    def block(match):
        name, path = match.group(1), results / f"{match.group(1)}.json"
        if not path.is_file():
            raise FileNotFoundError(f"README block {name!r} needs {path}; make it with "
                                    f"`foresight-report save {name} <run or sweep dir>`")
        return f"<!-- report:{name} -->\n{render(json.loads(path.read_text()), name)}\n<!-- /report:{name} -->"

    new = BLOCK.sub(block, text)
    if new != text:
        atomic_write(readme, lambda tmp: Path(tmp).write_text(new))
    return names


def save(name: str, path: Path, results: Path) -> Path:
    """A control or score run's results.json (with the command that made it), a horizon run's horizon.json,
    or a whole sweep, as results/NAME.json."""
    run = path.parent if path.is_file() else path
    file = run / ("horizon.json" if (run / "horizon.json").is_file() else "results.json")
    if file.is_file():  # one run: foresight-horizon's, foresight-score's (it lists its scores) or foresight-control's
        raw = json.loads(file.read_text())
        kind = "horizon" if file.name == "horizon.json" else "score" if "scores" in raw else "control"
        data = {"kind": kind, "command": command(run, program=f"foresight-{kind}"), "source": str(run), **raw}
    else:
        data = collect(path)
    render(data, name)  # fails now, not at the next README rebuild
    return write_json(results / f"{name}.json", data)


def sweep_report(sweep_dir: Path, out: Path) -> str:
    data = collect(sweep_dir)
    table = render_robustness(data)
    heatmap(data, out / "robustness")
    write_json(out / "robustness.json", data)
    atomic_write(out / "robustness.md", lambda tmp: Path(tmp).write_text(
        f"Success with 95% Wilson intervals; first seed {data['first_seed']}.\n"
        f"`{data['command'] or 'foresight-control -m +sweep=robustness'}`\n\n{table}\n"))
    return table


@clean_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="foresight-report", description=__doc__.split("\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results files' directory")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("sweep", help="heatmap, table and numbers of a foresight-control sweep")
    p.add_argument("dir", type=Path)
    p.add_argument("--out", type=Path, help="default: DIR/report")
    p = sub.add_parser("save", help="keep a run's or a sweep's numbers as RESULTS/NAME.json")
    p.add_argument("name")
    p.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "sweep":
        out = args.out or args.dir / "report"
        print(sweep_report(args.dir, out))
        print(f"report: {out}/robustness.{{png,pdf,md,json}}")
    elif args.command == "save":
        print(f"saved: {save(args.name, args.path, args.results)}")
    else:
        names = rewrite_readme(args.readme, args.results)
        print(f"{args.readme}: rebuilt {', '.join(names)}")


if __name__ == "__main__":
    main()
