"""Data-parallel synthesis and fine-tuning under torch.distributed: 2 CPU processes, gloo."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fddaq.config import QuantConfig, SynthConfig
from fddaq.distributed import Ranks
from fddaq.errors import ConfigError
from fddaq.recipes import recipe_config


def flat(module: torch.nn.Module, buffers: bool = True) -> torch.Tensor:
    tensors = [*module.parameters(), *(module.buffers() if buffers else ())]
    return torch.cat([t.detach().flatten() for t in tensors])


def worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fddaq.distributed import current, join, leave
    from fddaq.evaluate import layer_sqnr, predict
    from fddaq.finetune import finetune
    from fddaq.quant.calibrate import calibrate
    from fddaq.quant.modules import quant_layers
    from fddaq.stats import batchnorm_layers, class_statistics
    from fddaq.synth.train import train_generator
    from tests.conftest import fake_quant_model
    from tests.models import TinyResNet, randomize_bn

    assert join(torch.device("cpu")) == Ranks(rank, world, rank)
    try:
        torch.manual_seed(0)
        teacher = randomize_bn(TinyResNet())
        images = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(40) % 5
        layers = batchnorm_layers(teacher, images[:1])
        statistics = class_statistics(teacher, layers, images, labels, 5)
        synth = train_generator(teacher, layers, statistics, (1, 16, 16), SynthConfig(steps=3, batch_size=8, width=8),
                                ranks=current())
        # the generator's BatchNorm running statistics follow each rank's batches and are never used
        results = {"generator": flat(synth.generator, buffers=False), "synth_losses": torch.tensor(synth.curves["total"])}
        for recipe in ("fddaq", "fdda-paper"):
            config = recipe_config(recipe, QuantConfig(4, 4), steps=4).finetune
            config = type(config)(**{**config.__dict__, "batch_size": 8, "observe_fraction": 0.5, "holdout": 0.0})
            student = fake_quant_model(teacher, weight_bits=4, act_bits=4)
            calibrate(student, images)
            checkpoints = []
            finetune(student, teacher, (images, labels), config, on_checkpoint=checkpoints.append, ranks=current())
            results[recipe] = flat(student)
            results[recipe + "_ranges"] = torch.tensor([layer.input_quant.observed_range() or (0.0, 0.0)
                                                        for layer in quant_layers(student)])
            results[recipe + "_checkpoints"] = torch.tensor(len(checkpoints))
        # evaluation: each rank takes its part of an odd number of images, all get the whole answer
        ranks, odd, names = current(), images[:7], [layer.name for layer in quant_layers(student)]
        results["predict"] = torch.stack([predict(student, odd, batch_size=2, ranks=ranks), predict(student, odd)])
        results["predict_one"] = torch.stack([predict(student, odd[:1], ranks=ranks), predict(student, odd[:1])])
        sqnr = [layer_sqnr(student, odd, batch_size=2, ranks=r) for r in (ranks, Ranks())]
        results["sqnr"] = torch.tensor([[s[name] for name in names] for s in sqnr])
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        leave()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_in_step_on_different_batches(tmp_path):
    mp.start_processes(worker, args=(2, free_port(), tmp_path), nprocs=2, start_method="spawn")
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("generator", "fddaq", "fdda-paper", "fdda-paper_ranges"):
        assert torch.equal(first[key], second[key]), key  # gradients and observed ranges were averaged
    assert not torch.equal(first["synth_losses"], second["synth_losses"])  # each rank drew its own batches
    assert first["fdda-paper_ranges"].abs().sum() > 0
    assert first["fddaq_checkpoints"].item() > 0 and second["fddaq_checkpoints"].item() == 0  # rank 0 alone
    for results in (first, second):
        assert torch.allclose(results["predict"][0], results["predict"][1], atol=1e-6)
        assert torch.equal(results["predict_one"][0], results["predict_one"][1])
        # float convolutions of different batch sizes may differ in the last bit (with a bias)
        assert torch.allclose(results["sqnr"][0], results["sqnr"][1], rtol=1e-6)


def test_a_global_batch_must_split_evenly():
    with pytest.raises(ConfigError, match="batch_size=9 must be a multiple of the 2 processes"):
        Ranks(1, 2).share(9, "batch_size")
    assert Ranks(1, 4).share(32, "batch_size") == 8 and Ranks().share(9, "batch_size") == 9


@pytest.mark.parametrize("count, world", [(7, 2), (5, 4), (3, 4), (0, 3), (10, 1)])
def test_ranks_split_items_into_contiguous_nearly_equal_parts(count, world):
    parts = [range(count)[Ranks(rank, world).part(count)] for rank in range(world)]
    assert [i for part in parts for i in part] == list(range(count))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
