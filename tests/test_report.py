"""foresight-report: a sweep's table and heatmap, results files, and the README's blocks rebuilt from them.
Fast: fake results.json files in control.py's schema; one small real multirun at the end."""

import json
from pathlib import Path

import pytest

from experiments.common import success_summary, wilson_interval
from experiments.report import collect, main, render_control, render_robustness
from test_entry_points import run

AXES = ["lighting", "table", "distractors", "distractor_colours", "camera_pose", "camera_shake", "displace", "noise"]


def summary(wins: int, n: int) -> dict:
    return {**success_summary([True] * wins + [False] * (n - wins), [10] * n),
            "plan_ms_median": 20.0, "plan_ms_p95": 30.0, "plan_ms_per_step": 5.0, "evaluations_per_replan": 32.0}


def fake_run(run_dir: Path, wins: dict, split="train", first_seed=1_000_000, overrides=(), **strengths) -> Path:
    """A foresight-control run dir: results.json as control.py writes it; wins[mode][family] = (k, n)."""
    results = {}
    for mode, per in wins.items():
        results[mode] = {family: summary(k, n) for family, (k, n) in per.items()}
        if len(per) > 1:
            k, n = map(sum, zip(*per.values()))
            results[mode]["all"] = summary(k, n)
    env = {"id": "foresight/Tabletop-v0", "instruction_split": split,
           "perturbations": {axis: strengths.get(axis, 0.0) for axis in AXES}}
    episodes = {m: {f: [{"seed": first_seed + i, "success": i < k, "steps": 10} for i in range(n)]
                    for f, (k, n) in per.items()} for m, per in wins.items()}
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / "results.json").write_text(json.dumps(
        {"env": env, "planner": {"horizon": 4}, "checkpoints": "checkpoints/tabletop", "first_seed": first_seed,
         "results": results, "episodes": episodes}))
    return run_dir


def fake_sweep(root: Path) -> Path:
    """Jobs as a multirun lays them out (0/, 1/, ... 10/), each one condition x one mode, in shuffled order."""
    jobs = [({"lighting": 0.5}, "train", "vla", (3, 5)), ({}, "heldout", "vla_cem", (1, 5)),
            ({}, "train", "vla", (4, 5)), ({"lighting": 0.5}, "train", "vla_cem", (0, 5)),
            ({}, "heldout", "vla", (2, 5)), ({}, "train", "vla_cem", (5, 5))]
    for num, (strengths, split, mode, counts) in zip([0, 1, 2, 3, 10, 11], jobs):
        fake_run(root / str(num), {mode: {"push_to_pad": counts}}, split=split, **strengths)
    return root


def test_a_sweep_becomes_a_table_with_wilson_intervals_a_heatmap_and_its_numbers(tmp_path, capsys):
    sweep = fake_sweep(tmp_path / "sweep")
    data = collect(sweep)
    assert data["conditions"] == ["baseline", "heldout", "lighting 0.5"] and data["modes"] == ["vla", "vla_cem"]
    lo, hi = wilson_interval(2, 5)
    assert f"| heldout | 2/5 (40%) [{100 * lo:.1f}, {100 * hi:.1f}] | 1/5 (20%) [" in render_robustness(data)
    assert "| baseline | 4/5 (80%) [" in render_robustness(data) and "5/5 (100%) [56.6, 100] |" in render_robustness(data)

    main(["sweep", str(sweep)])
    assert "| lighting 0.5 | 3/5 (60%)" in capsys.readouterr().out
    out = sweep / "report"
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "robustness.pdf").stat().st_size
    numbers = json.loads((out / "robustness.json").read_text())
    assert numbers["cells"]["heldout"]["vla"]["push_to_pad"]["ci95"] == pytest.approx([lo, hi])
    assert "| heldout |" in (out / "robustness.md").read_text()


def test_one_mode_sweeps_get_a_column_per_family(tmp_path):
    wins = {"vla": {"reach": (5, 5), "push_to_pad": (1, 5)}}
    fake_run(tmp_path / "a", wins)
    fake_run(tmp_path / "b", wins, camera_pose=0.25)
    table = render_robustness(collect(tmp_path))
    assert table.splitlines()[0] == "| condition | reach | push_to_pad | all |"
    assert table.splitlines()[3].startswith("| camera_pose 0.25 | 5/5 (100%) [56.6, 100] | 1/5 (20%) [3.6, 62.4] | 60.0% [")


def test_unpaired_or_duplicate_jobs_are_refused_in_one_line(tmp_path, capsys):
    fake_run(tmp_path / "a" / "0", {"vla": {"reach": (1, 2)}})
    fake_run(tmp_path / "a" / "1", {"vla": {"reach": (1, 2)}}, first_seed=7)
    fake_run(tmp_path / "b" / "0", {"vla": {"reach": (1, 2)}})
    fake_run(tmp_path / "b" / "1", {"vla": {"reach": (2, 2)}})
    for sweep, message in [("a", "not paired"), ("b", "two jobs ran vla under baseline"), ("none", "no results.json")]:
        with pytest.raises(SystemExit) as exit:
            main(["sweep", str(tmp_path / sweep)])
        assert exit.value.code == 2 and message in capsys.readouterr().err


def test_the_main_job_table_is_the_readme_format(tmp_path):
    run_dir = fake_run(tmp_path / "run", {"vla": {"reach": (50, 50), "push_to_pad": (14, 50)},
                                          "cem": {"reach": (7, 50), "push_to_pad": (0, 50)}})
    lines = render_control(json.loads((run_dir / "results.json").read_text())).splitlines()
    assert lines[:2] == ["| mode | reach | push_to_pad | all | plan ms median (p95) | rollouts/plan |", "|---|---|---|---|---|---|"]
    assert lines[2] == "| vla | 50/50 (100%) [92.9, 100] | 14/50 (28%) [17.5, 41.7] | 64.0% [54.2, 72.7] | 20.0 (30.0) | 32 |"
    assert lines[3].startswith("| cem | 7/50 (14%) [7.0, 26.2] | 0/50 (0%) [0, 7.1] | 7.0% [")


README = """# Project

Prose that stays.

<!-- report:main_job -->
| stale | table |
|---|---|
<!-- /report:main_job -->

| a hand-written | table that stays |
|---|---|

<!-- report:sweep -->
<!-- /report:sweep -->
The end.
"""


def test_the_readme_blocks_are_rebuilt_from_saved_results_and_nothing_else_changes(tmp_path, capsys):
    results, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text(README)
    run_dir = fake_run(tmp_path / "run", {"vla": {"reach": (3, 4)}}, overrides=["modes=[vla]", "episodes=4"])
    main(["--results", str(results), "save", "main_job", str(run_dir)])
    main(["--results", str(results), "save", "sweep", str(fake_sweep(tmp_path / "sweep"))])
    saved = json.loads((results / "main_job.json").read_text())
    assert saved["kind"] == "control" and saved["command"] == "foresight-control 'modes=[vla]' episodes=4"

    main(["--readme", str(readme), "--results", str(results)])
    text = readme.read_text()
    table = render_control(saved)
    assert text == README.replace("| stale | table |\n|---|---|\n", table + "\n").replace(
        "<!-- report:sweep -->\n", "<!-- report:sweep -->\n" + render_robustness(collect(tmp_path / "sweep")) + "\n")
    main(["--readme", str(readme), "--results", str(results)])
    assert readme.read_text() == text  # idempotent

    (results / "sweep.json").unlink()
    for readme_text, message in [(README, "needs " + str(results / "sweep.json")),
                                 (README.replace("<!-- /report:main_job -->", ""), "has no `<!-- /report:main_job -->`"),
                                 ("# no blocks\n", "has no `<!-- report:NAME -->`")]:
        readme.write_text(readme_text)
        with pytest.raises(SystemExit) as exit:
            main(["--readme", str(readme), "--results", str(results)])
        assert exit.value.code == 2 and message in capsys.readouterr().err
        assert readme.read_text() == readme_text  # untouched on error


def test_a_real_multirun_then_its_report(tmp_path, tiny_checkpoints):
    """foresight-control -m over 2 axes x 1 mode x 1 episode, then foresight-report on the sweep dir.
    Hydra's basic (sequential) launcher: joblib's worker processes add start-up time to a test."""
    sweep = tmp_path / "sweep"
    run(["foresight-control", "-m", "+sweep=robustness", "condition=lighting,camera_shake", "modes=[vla]",
         "families=[reach]", "episodes=1", "env.image_size=32", f"checkpoints={tiny_checkpoints}",
         "hydra/launcher=basic", f"hydra.sweep.dir={sweep}"], tmp_path)
    result = run(["foresight-report", "sweep", str(sweep)], tmp_path)
    assert "| lighting 0.5 | " in result.stdout and "| camera_shake 0.5 | " in result.stdout
    data = json.loads((sweep / "report" / "robustness.json").read_text())
    assert data["modes"] == ["vla"] and data["command"].startswith("foresight-control -m +sweep=robustness")
    assert (sweep / "report" / "robustness.png").is_file()
