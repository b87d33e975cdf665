"""run_epoch: the epoch's loss weighted by examples, skips counted apart, progress optional."""

from __future__ import annotations

import pytest
import torch

import funcaccum as fa


def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
    x, y = batch  # x: (m, 3), y: (m,)
    return torch.mean((x @ params["w"] - y) ** 2)


def test_the_epoch_loss_weights_every_example_once() -> None:
    """A partial last batch: the plain mean of step losses and the last loss are both wrong."""
    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.sgd(0.0),
        accumulation=fa.Accumulation(num_microbatches=2),
    )
    state = step.init({"w": torch.zeros(3, dtype=torch.float64)})
    x, y = torch.ones(10, 3, dtype=torch.float64), torch.arange(10, dtype=torch.float64)
    loader = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # 4, 4, 2 examples
    state, epoch = fa.run_epoch(step, state, loader, progress=True, description="test")
    assert epoch.loss.item() == (y**2).mean().item()  # 28.5, every example once
    per_step = [(b[1] ** 2).mean().item() for b in loader]
    assert epoch.loss.item() != sum(per_step) / 3  # 36.5: the partial batch overweighted
    assert epoch.last.loss.item() == per_step[-1]  # 72.5: the last batch's
    assert (epoch.steps, epoch.skipped, epoch.weight.item()) == (3, 0, 10.0)
    assert state.step.item() == 3


def test_skipped_steps_count_apart_and_do_not_enter_the_loss() -> None:
    step = fa.train_step(loss_fn, optimizer=fa.optim.sgd(0.01))
    state = step.init({"w": torch.zeros(3, dtype=torch.float64)})
    x, y = torch.ones(6, 3, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    loader = [(x, y), (x * torch.nan, y), (x, y)]
    state, epoch = fa.run_epoch(step, state, loader)
    assert (epoch.steps, epoch.skipped, epoch.weight.item()) == (2, 1, 12.0)
    assert torch.isfinite(epoch.loss)
    assert state.skipped.item() == 1


class Stream(torch.utils.data.IterableDataset):
    """Examples one by one, as a streaming dataset gives them: no len()."""

    def __iter__(self):
        x, y = torch.ones(10, 3, dtype=torch.float64), torch.arange(10, dtype=torch.float64)
        yield from zip(x, y, strict=True)


def a_step(k: int = 2, rate: float = 0.0) -> fa.TrainStep:
    return fa.train_step(loss_fn, optimizer=fa.optim.sgd(rate),
                         accumulation=fa.Accumulation(num_microbatches=k))  # fmt: skip


def test_a_loader_over_an_iterable_dataset_runs_and_shows_its_progress() -> None:
    """DataLoader over an IterableDataset has __len__, which raises: the bar goes without it."""
    step = a_step()
    loader = torch.utils.data.DataLoader(Stream(), batch_size=4)  # 4, 4 and 2 examples
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    _, epoch = fa.run_epoch(step, step.init(params), loader, progress=True)
    assert (epoch.steps, int(epoch.weight)) == (3, 10)
    assert epoch.loss.item() == (torch.arange(10.0) ** 2).mean().item()


def test_a_short_last_batch_runs_with_one_microbatch_per_example() -> None:
    """3 examples under num_microbatches=4: refused by the step, planned by the epoch."""
    step = a_step(k=4, rate=0.01)
    x, y = torch.randn(11, 3, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    seen = []

    def count(index: int, state: fa.TrainState, metrics: fa.StepMetrics) -> None:
        seen.append(int(metrics.microbatches))

    state, epoch = fa.run_epoch(step, step.init(params), loader, on_step=count)
    assert (epoch.steps, int(epoch.weight), seen) == (2, 11, [4, 3])
    # The same update as a step over 3 microbatches of one example: exact, nothing dropped.
    three = fa.train_step(loss_fn, optimizer=fa.optim.sgd(0.01),
                          accumulation=fa.Accumulation(num_microbatches=3))  # fmt: skip
    reference, _ = step(step.init(params), loader[0])
    reference, _ = three(reference, loader[1])
    assert torch.equal(state.params["w"], reference.params["w"])
    with pytest.raises(fa.FuncaccumError, match="num_microbatches=4 is more than"):
        step(state, loader[1])  # the step alone still refuses it


def test_an_exhausted_iterator_is_refused_not_run_for_zero_steps() -> None:
    step = a_step()
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    x, y = torch.ones(4, 3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    batches = ((x, y) for _ in range(2))
    state, first = fa.run_epoch(step, step.init(params), batches)
    assert first.steps == 2
    with pytest.raises(fa.FuncaccumError, match=r"got no batches.*used up"):
        fa.run_epoch(step, state, batches)
    with pytest.raises(fa.FuncaccumError, match="got no batches"):
        fa.run_epoch(step, state, [])


def test_a_log_file_gets_a_line_per_step_with_step_count_loss_lr_and_throughput(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Output not a terminal (a file, as on a cluster): plain lines, not one bar at the end."""
    step = fa.train_step(loss_fn, optimizer=fa.optim.sgd(fa.optim.linear_schedule(0.1, 0.0, 4)),
                         accumulation=fa.Accumulation(num_microbatches=2))  # fmt: skip
    x, y = torch.ones(8, 3, dtype=torch.float64), torch.arange(8, dtype=torch.float64)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])] * 2
    fa.run_epoch(step, step.init({"w": torch.zeros(3, dtype=torch.float64)}), loader,
                 progress=True, description="train", unit="tokens")  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5, lines  # four steps, and the epoch's end
    assert lines[0].startswith("train step 1/4: loss ")
    assert "lr 0.1," in lines[0]
    assert all(words in lines[1] for words in ("lr 0.075,", "tokens/s", "0 skipped"))
    assert lines[-1].startswith("train done: 4 steps, loss ")
    assert "over 16 tokens" in lines[-1]
    fa.run_epoch(step, step.init({"w": torch.zeros(3, dtype=torch.float64)}), loader,
                 progress=True, log_every=2)  # fmt: skip
    assert len(capsys.readouterr().out.splitlines()) == 3  # steps 2 and 4, and the end


def test_on_step_sees_every_step_in_order() -> None:
    step = a_step(rate=0.1)
    x, y = torch.ones(4, 3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    calls = []

    def record(index: int, state: fa.TrainState, metrics: fa.StepMetrics) -> None:
        calls.append((index, int(state.step), float(metrics.loss)))

    params = {"w": torch.zeros(3, dtype=torch.float64)}
    fa.run_epoch(step, step.init(params), [(x, y)] * 3, on_step=record)
    assert [(i, n) for i, n, _ in calls] == [(0, 1), (1, 2), (2, 3)]
    assert calls[0][2] > calls[-1][2]  # it trained


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"progress": "yes"}, "progress must be True or False"),
        ({"log_every": 0}, "log_every must be >= 1"),
        ({"on_step": 3}, "on_step must be"),
        ({"unit": None}, "unit must be a str"),
    ],
)
def test_bad_arguments_are_refused(arguments: dict, words: str) -> None:
    step = a_step()
    with pytest.raises(fa.FuncaccumError, match=words):
        fa.run_epoch(step, step.init({"w": torch.zeros(3)}), [(torch.ones(4, 3), torch.ones(4))],
                     **arguments)  # fmt: skip


def test_a_short_batch_with_batch_norm_runs_in_microbatches_of_two() -> None:
    """Batch norm cannot normalise one example: a short batch under has_state goes in pairs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 1))  # fmt: skip
    apply, params, buffers = fa.functional_model(model, has_state=True)

    def bn_loss(params: dict, state: dict, batch: tuple) -> tuple:
        out, state = apply(params, state, batch[0])
        return ((out.squeeze(-1) - batch[1]) ** 2).mean(), state

    accumulation = fa.Accumulation(num_microbatches=4, has_state=True)
    step = fa.train_step(bn_loss, optimizer=fa.optim.sgd(0.1), accumulation=accumulation)
    x, y = torch.randn(16, 3), torch.randn(16)
    loader = [(x[:8], y[:8]), (x[8:13], y[8:13]), (x[13:], y[13:])]
    seen = []

    def count(index: int, state: fa.TrainState, metrics: fa.StepMetrics) -> None:
        seen.append(int(metrics.microbatches))

    state, epoch = fa.run_epoch(step, step.init(params, model_state=buffers), loader,
                                on_step=count)  # fmt: skip
    assert (epoch.steps, int(epoch.weight), seen) == (3, 16, [4, 2, 1])  # 5: 3 + 2; 3: one
    assert int(state.model_state["1.num_batches_tracked"]) == 7
