"""``precision: auto`` (svhn.precision, svhn.train.trainer): bf16 where the machine computes
it natively, float32 on a CPU that would emulate it, and an explicit precision always as
given; svhn.predict says when a checkpoint's bf16 would run emulated."""

import pytest
import torch

from svhn import precision
from svhn.precision import auto_precision, cpu_bf16_flags, emulated_bf16_notice
from svhn.train.trainer import Trainer

XEON_FLAGS = "fpu vme sse4_2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN2_FLAGS = "fpu vme sse4_2 fma avx avx2 sse4a"


def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: {flags}\n")
    return path


def test_the_bf16_flags_are_read_from_cpuinfo(tmp_path):
    assert cpu_bf16_flags(cpuinfo(tmp_path, XEON_FLAGS)) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_flags(cpuinfo(tmp_path, ZEN2_FLAGS)) == []
    assert cpu_bf16_flags(tmp_path / "missing") == []  # not Linux: nothing said


@pytest.fixture
def cpu_with(monkeypatch):
    def patch(flags: list[str]) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return patch


def test_auto_is_bf16_only_on_a_cpu_that_has_it(cpu_with):
    cpu_with(["avx512_bf16"])
    assert auto_precision("cpu") == ("bf16-mixed", "this CPU has avx512_bf16")
    assert auto_precision("auto")[0] == "bf16-mixed"
    cpu_with([])
    chosen, why = auto_precision("auto")
    assert chosen == "32-true" and "emulated" in why


def test_auto_on_gpus_and_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_precision("auto")[0] == "bf16-mixed"
    assert auto_precision("gpu")[0] == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_precision("cuda")[0] == "16-mixed"  # a V100 or T4: float16 with scaling
    assert auto_precision("mps")[0] == "32-true"


@pytest.mark.parametrize("flags,expected", [(["amx_bf16"], "bf16-mixed"), ([], "32-true")])
def test_the_trainer_resolves_auto_and_says_why(cpu_with, capsys, flags, expected):
    cpu_with(flags)
    trainer = Trainer(precision="auto", accelerator="cpu", logger=False,
                      enable_checkpointing=False)
    assert trainer.precision == expected
    assert f"Precision: {expected} (auto: this CPU has" in capsys.readouterr().out


def test_an_explicit_precision_is_used_as_given_and_emulated_bf16_is_said(cpu_with, capsys):
    cpu_with([])  # bf16 would be emulated here, and is still what was asked for
    trainer = Trainer(precision="bf16-mixed", accelerator="cpu", logger=False,
                      enable_checkpointing=False)
    assert trainer.precision == "bf16-mixed"
    out = capsys.readouterr().out
    assert "is emulated" in out and "--trainer.precision auto" in out
    assert "Precision:" not in out  # nothing was chosen for the user
    Trainer(precision="32-true", accelerator="cpu", logger=False, enable_checkpointing=False)
    cpu_with(["avx512_bf16"])
    Trainer(precision="bf16-mixed", accelerator="cpu", logger=False, enable_checkpointing=False)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("flags,expected", [(["avx512_bf16"], "bf16-mixed"), ([], "32-true")])
def test_a_fit_with_auto_records_what_it_ran_in(easy_data_dir, tmp_path, cpu_with, flags,
                                                 expected):
    # What svhn.predict reads to run a checkpoint in its validation's precision: never "auto"
    from helpers.runs import fit_easy, short_fit_args

    from svhn.checkpoint_format import read_checkpoint

    cpu_with(flags)
    run = fit_easy(easy_data_dir, tmp_path / "cache", tmp_path / "runs",
                   *short_fit_args("--trainer.max_epochs", "1", "--trainer.precision", "auto"))
    assert read_checkpoint(run.last).precision == expected


def test_the_emulated_bf16_notice_is_said_only_where_it_is_true(cpu_with, monkeypatch):
    cpu_with([])
    assert emulated_bf16_notice("bf16-mixed", "cpu", fix="do X.").endswith("float32: do X.")
    assert emulated_bf16_notice("32-true", "cpu", fix="") is None
    assert emulated_bf16_notice("bf16-mixed", "gpu", fix="") is None
    cpu_with(["amx_bf16"])
    assert emulated_bf16_notice("bf16-mixed", "auto", fix="") is None


def test_predict_keeps_a_bf16_checkpoint_in_bf16_and_says_auto_is_faster(
        trained_checkpoint, tmp_path, capsys, cpu_with):
    from helpers.runs import run_predict

    cpu_with([])
    raw = torch.load(trained_checkpoint.best, weights_only=False)
    raw["trainer_precision"] = "bf16-mixed"
    bf16_trained = tmp_path / "bf16_trained.ckpt"
    torch.save(raw, bf16_trained)
    assert run_predict(trained_checkpoint, bf16_trained, out=tmp_path / "as.csv") == 0
    out = capsys.readouterr().out
    assert "in bf16-mixed (as validated)" in out and "--precision auto" in out
    assert run_predict(trained_checkpoint, bf16_trained, out=tmp_path / "auto.csv",
                       extra=("--precision", "auto")) == 0
    out = capsys.readouterr().out
    assert "in 32-true (auto: this CPU has no AVX512-BF16 or AMX" in out
    assert "--precision auto (or 32-true)" not in out  # the notice: only for bf16
