"""foresight-horizon (planning horizon against prediction error), run as a user runs it, on the tiny fixtures."""

import json

from experiments.report import main as report
from experiments.report import render_horizon

from test_control import SMALL_PLANNER
from test_entry_points import run


def test_horizon_measures_every_variant_on_the_same_windows_and_seeds(tmp_path, tiny_dataset, tiny_checkpoints):
    out = tmp_path / "run"
    result = run(["foresight-horizon", f"data={tiny_dataset}", f"eval_data={tiny_dataset}",
                  f"variants.default={tiny_checkpoints}/world_model", f"+variants.other={tiny_checkpoints}/world_model",
                  f"vla_variants.default={tiny_checkpoints}/vla", f"+vla_variants.jepa={tiny_checkpoints}/vla",
                  "max_horizon=2", "windows=8", "probe_frames=200", "horizons=[1,2]", "episodes=1",
                  "families=[reach]", "env.image_size=32", *SMALL_PLANNER, f"hydra.run.dir={out}"], tmp_path)
    data = json.loads((out / "horizon.json").read_text())
    ol = data["open_loop"]
    assert [w["horizon"] for w in ol["windows"]] == [1, 2]
    assert all(w["windows"] == 8 and 0 < w["episodes"] <= 10 and sum(w["families"].values()) == 8 for w in ol["windows"])
    assert ol["windows"][0]["available_windows"] >= ol["windows"][1]["available_windows"]
    assert set(ol["variants"]) == {"default", "other"}
    for v in ol["variants"].values():
        assert [r["horizon"] for r in v["rollout"]] == [1, 2] and len(v["probe"]["imagined"]) == 2
        assert all(r["copy_last"] > 0 and r["ratio"] == r["model"] / r["copy_last"] for r in v["rollout"])
        assert "real_error_of_table_width" in v["probe"]
    assert ol["variants"]["default"]["rollout"] == ol["variants"]["other"]["rollout"]  # same model, same windows
    cl = data["closed_loop"]
    assert cl["mode"] == "vla_cem" and set(cl["lines"]) == {"default", "other", "jepa"}
    for line in cl["lines"].values():
        assert [r["H"] for r in line["horizons"]] == [1, 2]
        assert all(r["episodes"] == 1 and r["ci95"][0] <= r["success_rate"] <= r["ci95"][1] for r in line["horizons"])
    for stem in ("rollout_ratio", "probe_imagined", "closed_loop_success"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.pdf").stat().st_size > 0
    assert "| default" in result.stdout

    report(["--results", str(tmp_path / "results"), "save", "horizon", str(out)])  # for the README's block
    saved = json.loads((tmp_path / "results" / "horizon.json").read_text())
    assert saved["kind"] == "horizon" and saved["command"].startswith("foresight-horizon data=")
    table = render_horizon(saved).splitlines()
    assert table[0] == "| world model | probe, real latents | h = 1 | h = 2 |"
    ratio = ol["variants"]["other"]["rollout"][1]["ratio"]
    assert table[3].startswith("| other | ") and f"| {ratio:.2f} / " in table[3]
    assert table[5] == "| vla_cem, line | H = 1 | H = 2 |"
    assert [row.split(" | ")[0] for row in table[7:]] == ["| default", "| other", "| jepa"]


def test_horizon_names_a_missing_variant_and_the_command_that_makes_it(tmp_path, tiny_dataset, tiny_checkpoints):
    missing = tmp_path / "ablations" / "no_language" / "world_model"
    result = run(["foresight-horizon", f"data={tiny_dataset}", f"eval_data={tiny_dataset}",
                  f"variants.default={tiny_checkpoints}/world_model", f"+variants.no_language={missing}",
                  f"hydra.run.dir={tmp_path}/run"], tmp_path, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no world_model checkpoint in {missing}")
    assert f"foresight-train target=world_model target.model.use_language=false target.out={missing}" in last
