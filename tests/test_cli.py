"""`alphalora analyze` end to end: report, CSV, plots, table, help and errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from alphalora.cli import main
from alphalora.spectral import SpectralReport
from tests.tiny_models import build


@pytest.fixture
def llama_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    build("llama").save_pretrained(folder)
    return folder


def test_analyze_writes_report_csv_and_plots(llama_dir, tmp_path, capsys):
    out, table, plots = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "plots"
    code = main(["analyze", str(llama_dir), "--estimator", "ww", "--precision", "fp64", "--out", str(out),
                 "--csv", str(table), "--plot", str(plots), "--no-progress"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["format_version"] == 1 and data["estimator"] == "ww" and data["precision"] == "fp64"
    required = {"name", "layer", "role", "shape", "alpha", "D", "xmin", "num_pl_spikes", "lambda_max",
                "log_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank",
                "entropy", "status", "warning"}
    assert all(required <= set(m) for m in data["matrices"])
    assert [layer["layer"] for layer in data["layers"]] == [0, 1]
    assert all({"layer", "alpha", "n_matrices"} <= set(layer) for layer in data["layers"])
    rows = list(csv.DictReader(table.open()))
    assert [r["name"] for r in rows] == [m["name"] for m in data["matrices"]]
    assert float(rows[0]["alpha"]) == pytest.approx(data["matrices"][0]["alpha"])
    pngs = sorted(p.name for p in plots.iterdir())
    assert "layer_alpha.png" in pngs and len([p for p in pngs if p.startswith("esd_")]) == 2
    assert all((plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    printed = capsys.readouterr().out
    assert "alpha (mean)" in printed and "gate" in printed
    # The report round-trips through the loader other verbs use.
    loaded = SpectralReport.load(out)
    assert loaded.layer_alphas() == [layer["alpha"] for layer in data["layers"]]


def test_plot_named_matrices(llama_dir, tmp_path):
    plots = tmp_path / "plots"
    name = "model.layers.1.mlp.down_proj"
    assert main(["analyze", str(llama_dir), "--out", str(tmp_path / "r.json"), "--plot", str(plots),
                 "--plot-matrices", name, "--no-progress"]) == 0
    assert (plots / f"esd_{name}.png").exists()
    spaced = f"{name}, model.layers.0.self_attn.q_proj"  # as people type lists: a space after the comma
    assert main(["analyze", str(llama_dir), "--out", str(tmp_path / "r2.json"), "--plot", str(tmp_path / "p2"),
                 "--plot-matrices", spaced, "--no-progress"]) == 0
    assert (tmp_path / "p2" / "esd_model.layers.0.self_attn.q_proj.png").exists()


def test_a_mistyped_plot_matrix_fails_before_any_file_is_written(llama_dir, tmp_path, capsys):
    out, table, plots = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "plots"
    code = main(["analyze", str(llama_dir), "--out", str(out), "--csv", str(table), "--plot", str(plots),
                 "--plot-matrices", "model.layers.1.mlp.down_proj,model.nothing", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no matrix named 'model.nothing'" in err and "model.layers.0" in err
    assert not out.exists() and not table.exists() and not plots.exists()


def test_an_output_that_cannot_be_written_fails_before_the_analysis_naming_the_users_path(llama_dir, tmp_path,
                                                                                          capsys, monkeypatch):
    import alphalora.spectral

    def must_not_run(*args, **kwargs):
        raise AssertionError("the analysis ran before the output paths were checked")

    monkeypatch.setattr(alphalora.spectral, "analyze", must_not_run)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert main(["analyze", str(llama_dir), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"Is a directory: {folder}" in err and ".tmp" not in err
    assert main(["analyze", str(llama_dir), "--out", str(tmp_path / "r.json"), "--csv", str(folder)]) == 2
    assert not (tmp_path / "r.json").exists()


def test_one_path_for_two_outputs_is_refused_before_either_is_written(llama_dir, tmp_path, capsys):
    """`--csv` at `--out`'s path replaced the JSON report with the table without a word."""
    report = tmp_path / "r.json"
    assert main(["analyze", str(llama_dir), "--out", str(report), "--csv", str(tmp_path / "." / "r.json"),
                 "--no-progress"]) == 2
    assert "is given for two outputs" in capsys.readouterr().err and not report.exists()
    plan = tmp_path / "plan.json"
    assert main(["allocate", "--alphas", "3,4", "--out", str(plan), "--plot", str(plan)]) == 2
    assert not plan.exists()


def test_target_modules_listed_with_spaces_are_the_names_without_them(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["allocate", "--alphas", "3,4", "--target-modules", "q, v ,down", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["target_modules"] == ["q", "v", "down"]


def test_allocate_refuses_another_methods_options_instead_of_ignoring_them(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["allocate", "--alphas", "3,4", "--preset", "2468", "--out", str(out)]) == 2
    assert "--preset: not read by --method alphalora" in capsys.readouterr().err
    assert main(["allocate", "--alphas", "3,4", "--method", "mola", "--preset", "24", "--beta", "5",
                 "--rounding", "compat", "--out", str(out)]) == 2
    assert "--beta, --rounding: not read by --method mola" in capsys.readouterr().err
    assert main(["allocate", "--method", "uniform", "--num-layers", "2", "--beta", "3", "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["allocate", "--alphas", "3,4", "--beta", "1", "--budget", "7", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["experts_per_layer"] == [3, 4]  # 7 in the ratio 3:4 (beta 1), by hand


@pytest.mark.parametrize("alphas, fragment", [("2,3,,4", "empty value"), ("", "empty value"), ("2,x", "'x'")])
def test_malformed_alphas_are_refused_not_read_as_fewer_layers(tmp_path, capsys, alphas, fragment):
    out = tmp_path / "plan.json"
    assert main(["allocate", "--alphas", alphas, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--alphas must be comma-separated numbers" in err and fragment in err and not out.exists()
    assert main(["allocate", "--alphas", "3,4,", "--beta", "1", "--budget", "7", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["experts_per_layer"] == [3, 4]  # a trailing comma ends the list


def test_a_plan_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_bytes('{"method": "caf\u00e9"}'.encode("latin-1"))
    assert main(["train", "--model", str(tmp_path), "--plan", str(plan), "--data", str(plan),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text (byte 15" in err and "Traceback" not in err, err


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_allocate_into_a_closed_pipe_saves_the_plan_without_a_traceback(tmp_path, unbuffered, monkeypatch):
    """`| head` closes the pipe early; `true` closes it before the command (seconds to import) prints a line."""
    out, plot = tmp_path / "plan.json", tmp_path / "p.png"
    monkeypatch.setenv("PYTHONUNBUFFERED", unbuffered)
    command = f"{sys.executable} -m alphalora.cli allocate --alphas 3,4,5,6 --out {out} --plot {plot} | true"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert json.loads(out.read_text())["experts_per_layer"] and plot.exists()


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_help_explains_each_option():
    result = subprocess.run([sys.executable, "-m", "alphalora.cli", "analyze", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ["--estimator", "--precision", "--device", "--out", "--csv", "--plot", "--include-embeddings"]:
        assert option in result.stdout
    assert "WeightWatcher" in result.stdout


@pytest.mark.parametrize("verb", ["analyze", "allocate", "train", "export", "serve"])
def test_help_shows_defaults_that_say_something(verb, capsys):
    """Each option's default where it has one (0 included), none for required or unset options."""
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    if verb == "train":
        assert "--batch-size BATCH_SIZE examples per device per step (default: 8)" in text
        assert "dropout (default: 0)" in text  # --seed: a zero default is still shown
        assert "(default: context)" in text and "(default: context) (default" not in text


def test_default_model_is_the_bundled_minilm(tmp_path, minilm_dir, capsys):
    out = tmp_path / "r.json"
    assert main(["analyze", "--out", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert len(data["layers"]) == 6 and data["estimator"] == "xmin_peak"
    # fp32 by default: the matrices whose fit reads eigenvalues under fp32's noise floor are said to be refined.
    refined = sum(m["refined_fp64"] for m in data["matrices"])
    fitted = sum(m["alpha"] is not None for m in data["matrices"])
    printed = capsys.readouterr().out
    assert refined > 0 and f"refined in fp64: {refined} of {fitted} matrices" in printed
    assert ("--precision fp64 computes each once" in printed) == (2 * refined > fitted)


@pytest.mark.parametrize("option", ["--max-num-seqs", "--max-loras", "--max-num-batched-tokens", "--max-model-len"])
def test_serve_refuses_a_zero_limit_before_loading_anything(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(tmp_path / "no-model"), option, "0"])
    assert exit_info.value.code == 2
    assert f"{option}: must be a positive integer, got '0'" in capsys.readouterr().err


def test_a_mistyped_option_gets_the_verbs_usage_and_the_nearest_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "m", "--plan", "p", "--data", "d", "--out", "o", "--lr-schedular", "cosine"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: alphalora train")
    assert "unrecognized arguments: --lr-schedular cosine" in err and "did you mean --lr-scheduler?" in err


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"alphalora {version('alphalora')}"


def test_plotting_a_matrix_whose_fit_failed_is_refused_before_any_file_is_written(tmp_path, capsys):
    import torch

    model = build("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    name = "model.layers.0.self_attn.q_proj"
    code = main(["analyze", str(tmp_path / "nan-model"), "--out", str(out), "--plot", str(plots),
                 "--plot-matrices", name, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"no spectrum to plot for '{name}': failed" in err and "Traceback" not in err
    assert not out.exists() and not plots.exists()
