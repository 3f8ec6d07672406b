"""The mistakes people make on the way from analyze to serve: each is one line naming the problem and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alphalora.cli import main
from tests.tiny_models import build


@pytest.fixture
def llama_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    build("llama").save_pretrained(folder)
    return folder


@pytest.fixture
def no_server(monkeypatch):
    """`serve` must refuse its input before it loads anything."""
    import alphalora.serving.openai.server as server

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the command line was checked")

    monkeypatch.setattr(server, "make_state", must_not_load)


def _main_catching_ctrl_c(argv: list[str]) -> int:
    """main(argv), failing the test (not stopping pytest) where a KeyboardInterrupt escapes it."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command as a traceback")


def _interrupted_training(out_dir, checkpoint: str):
    """A training run that Ctrl-C stops: after writing a complete checkpoint-5, a partial one (stopped while
    Trainer wrote it: no trainer_state.json, which it writes last) or none."""
    from alphalora.training.trainer import CHECKPOINT_FILES

    def train(*args, **kwargs):
        if checkpoint != "none":
            folder = out_dir / "checkpoints" / "checkpoint-5"
            folder.mkdir(parents=True)
            written = CHECKPOINT_FILES if checkpoint == "complete" else CHECKPOINT_FILES[:-1]
            for name in (*written, "rng_state.pth"):
                (folder / name).write_text("{}")
        raise KeyboardInterrupt

    return train


@pytest.mark.parametrize("checkpoint", ["complete", "partial", "none"])
def test_ctrl_c_during_training_is_one_line_saying_how_to_go_on(tmp_path, monkeypatch, capsys, checkpoint):
    import alphalora.training

    out = tmp_path / "adapter"
    monkeypatch.setattr(alphalora.training, "train", _interrupted_training(out, checkpoint))
    code = _main_catching_ctrl_c(["train", "--model", "m", "--plan", "p.json", "--data", "d.jsonl", "--out", str(out),
                                  "--save-steps", "5"])
    err = capsys.readouterr().err
    assert code == 130 and err.startswith("alphalora train: interrupted") and err.count("\n") == 1, err
    if checkpoint == "complete":
        assert "--resume" in err and str(out / "checkpoints" / "checkpoint-5") in err
    else:  # a partial checkpoint is none to resume from (--resume would refuse it)
        assert "no complete checkpoint was written yet (every --save-steps 5 steps)" in err and "--resume" not in err


def test_ctrl_c_during_an_analysis_is_one_line(tmp_path, monkeypatch, capsys):
    import alphalora.spectral

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(alphalora.spectral, "analyze", interrupted)
    assert _main_catching_ctrl_c(["analyze", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 130
    assert capsys.readouterr().err == "alphalora analyze: interrupted\n"


@pytest.mark.parametrize("device, fragment", [
    ("gpu", "unknown device 'gpu'; choose cpu, cuda or cuda:N"),
    ("cuda", "device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu"),
])
def test_serve_checks_the_device_before_loading(llama_dir, no_server, monkeypatch, capsys, device, fragment):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["serve", str(llama_dir), "--device", device]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_serve_names_a_path_that_is_no_model(tmp_path, llama_dir, no_server, capsys, monkeypatch):
    empty, no_weights, a_file = tmp_path / "empty", tmp_path / "no-weights", tmp_path / "data.jsonl"
    empty.mkdir()
    no_weights.mkdir()
    (no_weights / "config.json").write_text((llama_dir / "config.json").read_text())
    (no_weights / "training_args.bin").write_bytes(b"")  # a Trainer's output folder: a .bin, but no weights
    a_file.write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    expected = {
        str(empty): "is not a model folder (no config.json)",
        str(no_weights): f"no weights in {no_weights}: expected *.safetensors",
        str(a_file): "is a file; pass the model folder",
        "./missing": "model folder ./missing does not exist",  # a local path, not a Hub id to look up
    }
    for path, fragment in expected.items():
        assert main(["serve", path, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("alphalora serve: error:") and fragment in err, err


def test_serve_refuses_a_port_out_of_range(llama_dir, no_server, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(llama_dir), "--port", "99999"])
    assert exit_info.value.code == 2
    assert "--port: must be a port number from 1 to 65535, got '99999'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, positional", [
    (["analyze", "--model", "m"], "MODEL_DIR is positional"),
    (["serve", "--model", "m"], "MODEL_DIR is positional"),
    (["export", "--adapter", "a", "--out", "o"], "ADAPTER_DIR is positional"),
])
def test_an_option_for_a_positional_argument_names_it(argv, positional, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and positional in err and "did you mean --help" not in err, err


@pytest.mark.parametrize("verb", [[], ["analyze"], ["allocate"], ["train"], ["export"], ["serve"]])
def test_help_ends_with_examples_kept_line_by_line(verb):
    result = subprocess.run([sys.executable, "-m", "alphalora.cli", *verb, "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0
    examples = result.stdout.split("examples:\n", 1)[1].splitlines()
    commands = [line for line in examples if line.startswith("  alphalora ")]
    assert commands, result.stdout
    assert all(verb[0] in line for line in commands) if verb else len(commands) == 4  # the journey, one per step
