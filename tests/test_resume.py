"""refine --resume: a run cut short after an epoch and resumed writes the weights of an uninterrupted run."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

import irank
from irank.runtime.progress import Reporter


class StopAfterEpoch(Reporter):
    """Raises KeyboardInterrupt once epoch `epoch` is done (its state saved), as Ctrl-C would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def info(self, message: str) -> None:
        if message.startswith(f"epoch {self.epoch} "):
            raise KeyboardInterrupt


def refine(tiny_data, tiny_model, output, options, **kwargs):
    return irank.refine(tiny_model, tiny_data["train"], output=str(output), train_options=options,
                        run_options=irank.RunOptions(device="cpu", batch_size=32), **kwargs)


@pytest.mark.parametrize("options", [
    irank.TrainOptions(scope="full", epochs=3, lr=0.02, augment="flip", seed=5),
    irank.TrainOptions(scope="head", epochs=3, lr=0.05, seed=5),
], ids=["full-flip", "head-cached"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_data, tiny_model, tmp_path, options):
    refine(tiny_data, tiny_model, tmp_path / "whole.safetensors", options)
    output = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        refine(tiny_data, tiny_model, output, options, reporter=StopAfterEpoch(1))
    assert not output.exists() and (tmp_path / "resumed.safetensors.resume").exists()
    with pytest.raises(KeyboardInterrupt):  # a second interruption, after the resumed epoch 2
        refine(tiny_data, tiny_model, output, options, reporter=StopAfterEpoch(2), resume=True)
    result = refine(tiny_data, tiny_model, output, options, resume=True)
    assert [record["epoch"] for record in result.history] == [1, 2, 3]
    whole, resumed = load_file(str(tmp_path / "whole.safetensors")), load_file(str(output))
    assert whole.keys() == resumed.keys()
    assert all(whole[key].equal(resumed[key]) for key in whole)
    assert not (tmp_path / "resumed.safetensors.resume").exists()  # removed after a successful finish


def test_resume_refuses_a_state_from_other_options(cli, tiny_data, tiny_model, tmp_path):
    options = irank.TrainOptions(scope="head", epochs=2, lr=0.05)
    output = tmp_path / "r.safetensors"
    with pytest.raises(KeyboardInterrupt):
        refine(tiny_data, tiny_model, output, options, reporter=StopAfterEpoch(1))
    code, _, err = cli("refine", tiny_model, tiny_data["train"], "-o", output, "--scope", "head", "--epochs", "2",
                       "--lr", "0.1", "--batch-size", "32", "--resume")
    assert code == 3 and "--resume" in err and "other inputs or options" in err
    assert not output.exists()
    code, _, err = cli("refine", tiny_model, tiny_data["train"], "-o", output, "--scope", "head", "--epochs", "2",
                       "--lr", "0.05", "--batch-size", "32", "--device", "cpu", "--resume")
    assert code == 0, err
    assert "resuming from" in err and output.exists()
