"""Fixtures: a tiny generated image set with flipped labels and a tiny model trained on it in the test run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import irank
from irank.formats import synthetic


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """4 easy classes of 16×16 shapes, 240 training rows (10% flipped, `true_label` kept) and 80 clean test rows."""
    folder = tmp_path_factory.mktemp("tiny")
    train_csv, test_csv = synthetic.make_dataset(
        folder, shapes=("disk", "hstripes", "vstripes", "cross"), train_size=240, test_size=80, noise=0.1, image_size=16, pixel_noise=0.05, seed=3
    )
    return {"folder": folder, "train": str(train_csv), "test": str(test_csv)}


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tmp_path_factory) -> str:
    """tiny-cnn trained briefly on the noisy labels: it learns the shapes before it memorizes the flips."""
    output = str(tmp_path_factory.mktemp("model") / "model.safetensors")
    irank.train(
        "tiny-cnn", tiny_data["train"], output=output,
        train_options=irank.TrainOptions(scope="full", epochs=12, lr=0.05, seed=0),
        run_options=irank.RunOptions(device="cpu", batch_size=32),
    )
    return output


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the irank CLI in-process: returns (exit code, stdout, stderr)."""
    from irank.cli import main

    def run(*args: str, stdin: str | None = None):
        monkeypatch.setattr(sys, "argv", ["irank", *map(str, args)])
        if stdin is not None:
            import io

            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def listing(folder: Path) -> set[str]:
    return {p.name for p in Path(folder).iterdir()}
