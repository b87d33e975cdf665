"""funcaccum.testing: each check passes on equal inputs and fails, with its message, on faults."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    classification_batch,
    mlp_apply,
    mlp_loss,
    mlp_params,
    sequence_batch,
    sequence_params,
)
from torch.nn import functional

import funcaccum as fa
from funcaccum.testing import (
    Variant,
    assert_accumulation_exact,
    assert_max_compiles,
    assert_shape,
    assert_tree_all_finite,
    assert_tree_shapes_equal,
    assert_trees_allclose,
    assert_trees_equal,
    check_grads,
    variants,
)


def tree() -> dict[str, Any]:
    return {
        "layer": {
            "w": torch.ones(3, 2, dtype=torch.float64),
            "b": torch.zeros(2, dtype=torch.float64),
        }
    }


def test_allclose_passes_on_equal_trees_and_names_the_wrong_leaf() -> None:
    assert_trees_allclose(tree(), tree(), rtol=0, atol=0)
    planted = tree()
    planted["layer"]["b"][1] = 1e-3
    message = re.escape("leaf tree['layer']['b'] differs: max abs error 1.000e-03")
    with pytest.raises(AssertionError, match=message):
        assert_trees_allclose(planted, tree())


def test_structure_and_shape_mismatches_are_named() -> None:
    with pytest.raises(AssertionError, match="tree structures differ"):
        assert_trees_allclose({"w": torch.ones(1)}, {"v": torch.ones(1)})
    wrong_shape = {"layer": {"w": torch.ones(2, 3), "b": torch.zeros(2)}}
    with pytest.raises(
        AssertionError, match=re.escape("leaf tree['layer']['w'] has shape (2, 3), expected (3, 2)")
    ):
        assert_tree_shapes_equal(wrong_shape, tree())
    assert_tree_shapes_equal(tree(), tree())


def test_trees_equal_is_bitwise() -> None:
    assert_trees_equal(tree(), tree())
    negative_zero = tree()
    negative_zero["layer"]["b"][0] = -0.0  # == 0.0, yet other bits
    with pytest.raises(
        AssertionError,
        match=re.escape("leaf tree['layer']['b'] differs in 1 of 2 elements (bitwise)"),
    ):
        assert_trees_equal(negative_zero, tree())
    with pytest.raises(AssertionError, match=r"torch\.float32"):
        assert_trees_equal(fa.tree.cast(tree(), torch.float32), tree())


def test_all_finite_names_the_leaf_and_the_kind() -> None:
    assert_tree_all_finite(tree())
    planted = tree()
    planted["layer"]["w"][2, 1] = float("nan")
    with pytest.raises(
        AssertionError,
        match=re.escape(
            "leaf tree['layer']['w'] has 1 non-finite of 6 elements (1 NaN, 0 Inf), first at (2, 1)"
        ),
    ):
        assert_tree_all_finite(planted)


def test_assert_shape() -> None:
    assert assert_shape(torch.zeros(4, 8, 3), "k b d", k=4, d=3) == {"k": 4, "b": 8, "d": 3}
    with pytest.raises(AssertionError, match="k is 4"):
        assert_shape(torch.zeros(4, 8, 3), "k b d", k=2)
    with pytest.raises(AssertionError, match="does not match 'k b'"):
        assert_shape(torch.zeros(4, 8, 3), "k b")


class Square(torch.autograd.Function):
    """x**2 with hand-written derivatives, which the subclasses get wrong on purpose."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.x = x

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor) -> torch.Tensor:
        return 2 * ctx.x * tangent


class SquareWithWrongBackward(Square):
    """The backward is off by a relative 1e-3 (forward mode is right)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad * (1 + 1e-3)


class SquareFirstOrderOnly(Square):
    """Right first derivatives, built on a detached input: the second derivatives are lost."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x.detach() * grad

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor) -> torch.Tensor:
        return 2 * ctx.x.detach() * tangent


def test_check_grads_passes_a_correct_function_to_second_order() -> None:
    params = mlp_params(torch.float32, sizes=(5, 4, 3))
    check_grads(mlp_loss, params, classification_batch(6, torch.float32), order=2)


def test_check_grads_catches_a_gradient_wrong_by_1e_3() -> None:
    def loss(params: dict, x: torch.Tensor) -> torch.Tensor:
        return SquareWithWrongBackward.apply(x @ params["w"]).sum()

    params, x = {"w": torch.randn(3, 2)}, torch.randn(4, 3)
    with pytest.raises(
        AssertionError, match=r"order 1 VJP: torch\.func and central finite differences disagree"
    ):
        check_grads(loss, params, x)


def test_check_grads_catches_a_wrong_second_derivative() -> None:
    def loss(params: dict, x: torch.Tensor) -> torch.Tensor:
        return SquareFirstOrderOnly.apply(x @ params["w"]).sum()

    params, x = {"w": torch.randn(3, 2)}, torch.randn(4, 3)
    check_grads(loss, params, x, order=1)
    with pytest.raises(AssertionError, match="order 2"):
        check_grads(loss, params, x, order=2)


def test_assert_accumulation_exact_passes_correct_losses() -> None:
    assert_accumulation_exact(mlp_loss, mlp_params(), classification_batch(19), num_microbatches=4)
    from conftest import token_weighted_loss

    assert_accumulation_exact(
        token_weighted_loss,
        sequence_params(),
        sequence_batch(13),
        num_microbatches=4,
        has_weight=True,
    )


def test_assert_accumulation_exact_takes_strategy_objects_hashable_or_not() -> None:
    @dataclasses.dataclass  # eq without frozen: unhashable, as a user's strategy may be
    class Delegating:
        def build(self, folder: fa.extend.Folder) -> fa.extend.GroupRunner:
            return fa.scan().build(folder)

    strategies = [Delegating(), fa.vmap(), fa.chunked(2), "scan"]
    assert_accumulation_exact(
        mlp_loss, mlp_params(), classification_batch(19), num_microbatches=4, strategies=strategies
    )


def token_mean_without_weight(params: dict, batch: dict) -> torch.Tensor:
    from conftest import token_weighted_loss

    return token_weighted_loss(params, batch)[0]


def batch_norm_loss(params: dict, batch: dict) -> torch.Tensor:
    hidden = functional.batch_norm(batch["x"] @ params["layer0"]["w"], None, None, training=True)
    return functional.cross_entropy(hidden[:, :3], batch["y"])


def dropout_loss(params: dict, batch: dict) -> torch.Tensor:
    x = functional.dropout(batch["x"], p=0.3, training=True)
    return mlp_loss(params, {"x": x, "y": batch["y"]})


def summed_loss(params: dict, batch: dict) -> torch.Tensor:
    return mlp_loss(params, batch) * batch["y"].shape[0]  # the sum of per-example losses


@pytest.mark.parametrize(
    ("loss_fn", "params", "batch", "explanation"),
    [
        pytest.param(
            token_mean_without_weight, sequence_params(), sequence_batch(13),
            "loss_fn normalises each microbatch by its own count", id="per-microbatch-norm",
        ),
        pytest.param(
            batch_norm_loss, mlp_params(), classification_batch(19),
            "the model couples the examples of a microbatch (batch norm", id="batch-norm",
        ),
        pytest.param(
            dropout_loss, mlp_params(), classification_batch(19),
            "randomness differs between microbatches", id="dropout",
        ),
        pytest.param(
            summed_loss, mlp_params(), classification_batch(19),
            "loss_fn sums over its microbatch instead of averaging", id="sum",
        ),
    ],
)  # fmt: skip
def test_assert_accumulation_exact_explains_faulty_losses(
    loss_fn: Any, params: dict, batch: dict, explanation: str
) -> None:
    with pytest.raises(AssertionError, match=re.escape(explanation)) as error:
        assert_accumulation_exact(loss_fn, params, batch, num_microbatches=4)
    assert "differs from the full-batch gradient (vmap: relative error" in str(error.value)


def test_variants() -> None:
    names = [v.name for v in variants(cuda=False)]
    assert names == ["eager", "compiled"]
    assert [v.name for v in variants(compiled=False, cuda=True)] == ["eager", "cuda"]
    moved = Variant("eager", torch.device("cpu"), False).to({"x": torch.ones(1), "n": 3})
    assert moved["n"] == 3


def test_assert_max_compiles_catches_a_recompile() -> None:
    def affine(x: torch.Tensor, scale: Any) -> torch.Tensor:
        return x * scale + 1

    checked = assert_max_compiles(affine, 1, backend="eager")
    checked(torch.ones(2), torch.tensor(2.0))
    checked(torch.ones(2), torch.tensor(5.0))
    assert checked.compiles() == 1
    with pytest.raises(AssertionError, match="affine compiled 2 times, at most 1 allowed"):
        checked(torch.ones(2), 3.0)  # a Python number is specialised: a new graph


def test_the_plugin_is_registered(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.hasplugin("funcaccum")
    assert any(line.startswith("compile:") for line in pytestconfig.getini("markers"))


@pytest.mark.subprocess
def test_loading_the_plugin_imports_no_torch() -> None:
    """The pytest11 entry point loads in every pytest session; it must not import torch."""
    code = textwrap.dedent(
        """
        import sys
        from importlib.metadata import entry_points

        (plugin,) = [e for e in entry_points(group="pytest11") if e.name == "funcaccum"]
        plugin.load()
        assert "torch" not in sys.modules, "loading the plugin imported torch"
        assert "funcaccum" not in sys.modules, "loading the plugin imported funcaccum"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.subprocess
def test_the_plugin_in_a_fresh_session_is_lazy_and_its_fixtures_work(tmp_path: Path) -> None:
    """A session whose tests use no fixture of the plugin never imports torch."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    (tmp_path / "test_plain.py").write_text(
        "import sys\n\n\ndef test_no_torch():\n    assert 'torch' not in sys.modules\n"
    )
    (tmp_path / "test_fixtures.py").write_text(
        textwrap.dedent(
            """
            import torch


            def test_rng(fa_rng):
                assert isinstance(fa_rng, torch.Generator)


            def test_variant(fa_variant):
                assert fa_variant(torch.sin)(torch.zeros(2)).tolist() == [0.0, 0.0]
            """
        )
    )

    def pytest_run(*args: str) -> str:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        done = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "1 passed" in pytest_run("test_plain.py")
    # The compiled variants are deselected by the plugin's marker: eager (and cuda) only.
    assert "compile: a test that runs torch.compile" in pytest_run("--markers")
    out = pytest_run("test_fixtures.py", "-m", "not compile")
    assert "deselected" in out
    assert "passed" in out


def test_fa_rng_is_seeded_from_the_test_name(
    fa_rng: torch.Generator, request: pytest.FixtureRequest
) -> None:
    expected = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    assert torch.equal(torch.randn(3, generator=fa_rng), torch.randn(3, generator=expected))


def test_accumulation_in_every_variant(fa_variant: Variant) -> None:
    """The fa_variant fixture at work: one test, eager and compiled (and CUDA when present)."""
    params = fa_variant.to(mlp_params(torch.float32))
    batch = fa_variant.to(classification_batch(12, torch.float32))

    def accumulated(params: dict, batch: dict) -> dict:
        return fa.accumulate(mlp_loss, params, batch, num_microbatches=3, strategy="vmap").grads

    expected = torch.func.grad(mlp_loss)(params, batch)
    assert_trees_allclose(fa_variant(accumulated)(params, batch), expected, rtol=1e-5, atol=1e-6)


def layer_norm_loss(params: dict, x: torch.Tensor) -> torch.Tensor:
    return functional.layer_norm(x @ params["w"], (4,), params["g"], params["b"]).tanh().pow(2).mean()  # noqa: E501


def layer_norm_params() -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(3, 4, generator=g), "g": torch.randn(4, generator=g),
              "b": torch.randn(4, generator=g)}  # fmt: skip
    return params, torch.randn(5, 3, generator=g)


def test_check_grads_order_2_passes_a_model_with_layer_norm() -> None:
    """Its forward-over-forward derivative is torch's error; what order 2 checks is right."""
    params, x = layer_norm_params()
    check_grads(layer_norm_loss, params, x, order=2)
    # Why forward-over-forward is not checked: torch's disagrees with the true second
    # derivative, which forward-over-reverse and the same loss written with plain ops agree on.
    params = fa.tree.cast(params, torch.float64)
    x = x.double()
    tangent = fa.tree.scale(params, 1 / float(fa.tree.global_norm(params)))

    def plain(params: dict, x: torch.Tensor) -> torch.Tensor:
        h = x @ params["w"]
        h = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        return (h * params["g"] + params["b"]).tanh().pow(2).mean()

    def second(f: Any, how: str) -> float:
        if how == "forward-over-forward":
            inner = lambda p: torch.func.jvp(lambda q: f(q, x), (p,), (tangent,))[1]  # noqa: E731
            return float(torch.func.jvp(inner, (params,), (tangent,))[1])
        inner = lambda p: torch.func.grad(lambda q: f(q, x))(p)  # noqa: E731
        return float(fa.tree.vdot(torch.func.jvp(inner, (params,), (tangent,))[1], tangent))

    truth = second(plain, "forward-over-reverse")
    assert second(plain, "forward-over-forward") == pytest.approx(truth, rel=1e-10)
    assert second(layer_norm_loss, "forward-over-reverse") == pytest.approx(truth, rel=1e-10)
    fwd_fwd = second(layer_norm_loss, "forward-over-forward")
    if fwd_fwd == pytest.approx(truth, rel=1e-6):
        pytest.skip("this torch's forward-over-forward layer_norm is right: check it again")
    assert fwd_fwd != pytest.approx(truth, rel=1e-3)


def test_check_grads_refuses_an_order_it_does_not_know() -> None:
    with pytest.raises(fa.FuncaccumError, match="order must be 1 or 2, got 3"):
        check_grads(mlp_loss, mlp_params(), classification_batch(4), order=3)


def float32_logits_loss(params: dict, batch: dict) -> torch.Tensor:
    """As a Hugging Face labels= loss computes: the logits cast to float32, in any model."""
    return functional.cross_entropy(mlp_apply(params, batch["x"]).float(), batch["y"])


def test_assert_accumulation_exact_tolerances_follow_the_dtype_the_loss_computes_in() -> None:
    params, batch = mlp_params(), classification_batch(12)
    assert_accumulation_exact(float32_logits_loss, params, batch)  # float32: rtol 1e-5
    assert_accumulation_exact(mlp_loss, params, batch)  # float64: rtol 1e-9 as before
    assert_accumulation_exact(mlp_loss, fa.tree.cast(params, torch.float32),
                              fa.tree.cast(batch, torch.float32), dtype=None)  # fmt: skip


def test_a_rounding_difference_is_diagnosed_as_rounding_not_as_two_equal_ratios() -> None:
    """Asked for float64 tolerances on a float32 loss, the message says it is rounding."""
    params, batch = mlp_params(), classification_batch(12)
    with pytest.raises(AssertionError) as caught:
        assert_accumulation_exact(float32_logits_loss, params, batch, rtol=1e-12, atol=0)
    message = str(caught.value)
    assert "the difference is rounding" in message
    assert "computes in torch.float32" in message
    assert "normalises each microbatch by its own count" not in message
