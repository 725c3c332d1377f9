"""The first hour of a new user: what the commands say and do that they did not ask for.

A fit that decodes no split it does not read, a quick start whose closing advice names the
real-data recipe, real and generated images counted apart, a runs table that fits a
terminal, and a zoom search that does not take a reading of no digit for a sure one.
"""

from __future__ import annotations

import json

import torch
import yaml
from helpers.layout import write_layout
from helpers.repository import REPO
from helpers.runs import PLAIN_MODEL, fake_run

from svhn.analysis.runs import collect_runs, format_table
from svhn.analysis.runs import main as runs_main
from svhn.data.labels import BLANK, NUM_CLASSES
from svhn.model.vote import chains_unsure
from svhn.train import cli as fit_cli
from svhn.train.run_summary import RUN_SUMMARY_FILE

FLAGS = [*PLAIN_MODEL, "--data.num_workers", "0", "--data.batch_size", "8",
         "--data.image_size", "[32, 64]", "--trainer.max_epochs", "1",
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


def test_a_fit_decodes_no_split_it_does_not_read(tmp_path):
    data = write_layout(tmp_path / "mchar", train={f"{i:06d}.png": [i % 10] for i in range(8)},
                        val={f"{i:06d}.png": [i % 10] for i in range(4)},
                        test_a=[f"{i:06d}.png" for i in range(6)])
    cache = tmp_path / "cache"
    assert fit_cli.main([*FLAGS, "--data.data_dir", str(data), "--data.cache_dir",
                         str(cache)]) == 0
    cached = sorted(p.name.split("_")[0] for p in cache.rglob("*.npy"))
    assert cached == ["train", "val"]  # test A is read by svhn.predict, which caches it


def test_the_quick_start_points_at_the_real_data_recipe(tmp_path, capsys):
    assert fit_cli.main([*FLAGS, "--data.synthetic_fallback", "true",
                         "--data.synthetic_size", "16"]) == 0
    out = capsys.readouterr().out
    closing = out[out.rindex("SYNTHETIC house numbers"):]
    assert "python -m svhn.fit --config configs/real_cpu.yaml --data.data_dir data/mchar" \
        in closing
    assert "16 labelled images of the synthetic quick-start set" in out


def test_real_and_generated_images_are_counted_apart(tmp_path, capsys):
    data = write_layout(tmp_path / "mchar", train={f"{i:06d}.png": [i % 10] for i in range(8)},
                        val={f"{i:06d}.png": [i % 10] for i in range(4)})
    assert fit_cli.main([*FLAGS, "--data.data_dir", str(data), "--data.synthetic_extra", "12",
                         "--data.cache_dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert f"on 8 labelled images of {data} + 12 generated (data.synthetic_extra)" in out
    summary = json.loads(next((tmp_path / "runs").rglob(RUN_SUMMARY_FILE)).read_text())
    assert summary["train_images"]["data_dir"] == 8
    assert summary["train_images"]["synthetic"] == 12
    row = collect_runs(tmp_path / "runs").iloc[0]
    assert (row["train_images"], row["generated_images"]) == (8, 12)


def test_the_runs_table_fits_a_terminal_unless_asked_wide(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name in ("a_rather_long_run_name", "another_long_run_name"):
        run = fake_run(runs, name, [0.1, 0.2])
        (run / RUN_SUMMARY_FILE).write_text(json.dumps(
            {"configs": ["configs/real_cpu.yaml"], "train_images": {
                "data_dir": 2000, "extra": 4000, "synthetic": 4000},
             "sessions": [{"seconds": 10.0, "status": "finished"}]}))
    table = collect_runs(runs)
    narrow, wide = format_table(table), format_table(table, wide=True)
    assert max(len(line) for line in narrow.splitlines()[:3]) <= 160
    assert "checkpoint" not in narrow.splitlines()[0] and "checkpoint" in wide.splitlines()[0]
    assert "generated" in narrow.splitlines()[0] and " 4000 " in narrow
    assert runs_main([str(runs), "--wide"]) == 0
    assert "checkpoint" in capsys.readouterr().out.splitlines()[0]
    png = tmp_path / "eff.png"
    assert runs_main([str(runs), "--efficiency", str(png)]) == 0
    assert f"Data efficiency: {png}" in capsys.readouterr().err


def _sure(classes: list[int], max_len: int = 5) -> torch.Tensor:
    probs = torch.full((1, max_len, NUM_CLASSES), 0.001)
    for position, cls in enumerate(classes):
        probs[0, position, cls] = 1.0
    return probs / probs.sum(-1, keepdim=True)


def test_a_sure_reading_of_no_digit_is_searched():
    box = torch.tensor([[0.1, 0.1, 0.9, 0.9]])
    blanks, digits = _sure([BLANK] * 5), _sure([1, 7, BLANK, BLANK, BLANK])
    assert chains_unsure(blanks, blanks, box, box, gate=0.3).tolist() == [True]
    assert chains_unsure(digits, digits, box, box, gate=0.3).tolist() == [False]


def test_backbones_lists_the_real_data_recipes_backbone():
    from svhn.model.backbones import TIMM_EXAMPLES

    recipe = yaml.safe_load((REPO / "configs" / "real_cpu.yaml").read_text())
    assert recipe["model"]["backbone"] in TIMM_EXAMPLES
