"""Refit plans: checkpoint base weights plus the weights a LoRA set changes, applied by name to a real
(onnxruntime) engine; A -> B -> A restores exactly, an unchanged set does nothing, bad updates change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtrt.errors import RefitError
from sdtrt.pipeline.build import build_engine
from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint, read_unet_state_dict
from sdtrt.pipeline.refit import WeightTracker, merge
from sdtrt.profiles import Profile
from sdtrt.serving.session import EngineSession
from sdtrt.storage.registry import Registry


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    ckpt = tiny_checkpoint("sd1", 0)
    cache = tmp_path_factory.mktemp("refit-cache")
    out = build_engine(ckpt, [Profile.parse("1x64x64x75")], cache, backend="onnxruntime")
    return ckpt, cache, out.manifest.id


@pytest.fixture
def session(engine):  # type: ignore[no-untyped-def]
    _, cache, engine_id = engine
    s = EngineSession.open(Registry(cache), engine_id)
    yield s
    s.close()


def run(session: EngineSession, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The engine on a host-style call (x, timesteps, context)."""
    return session(session.contract.feeds(inputs, {}))


def base_loader(ckpt: Path):  # type: ignore[no-untyped-def]
    return lambda names: read_unet_state_dict(ckpt, names=names)


def changed_weights(sd: dict[str, torch.Tensor], names: list[str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: merge(sd[n], 0.5 * torch.randn(sd[n].shape, generator=g) * sd[n].std()) for n in names}


def torch_out(ckpt: Path, changes: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    info, sd = open_checkpoint(ckpt)
    unet = build_unet(info.info, {**sd, **changes})
    with torch.no_grad():
        return unet(*inputs)


def test_a_b_a_matches_pytorch_and_restores_exactly(engine, session: EngineSession) -> None:  # type: ignore[no-untyped-def]
    ckpt = engine[0]
    sd = read_unet_state_dict(ckpt)
    attn = sorted(n for n in sd if n.endswith("attn1.to_q.weight"))
    conv = sorted(n for n in sd if n.endswith("in_layers.2.weight"))
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 100.0]), torch.randn(2, 77, 768, generator=g))
    base_out = run(session, inputs)
    a = changed_weights(sd, attn[:2] + conv[:1], 1)
    b = changed_weights(sd, attn[1:3], 2)
    base = base_loader(ckpt)

    plan_a = session.apply_deltas(("A", 0.8), a, base)
    assert plan_a is not None and plan_a.changed == frozenset(a) and not plan_a.restored
    out_a = run(session, inputs)
    torch.testing.assert_close(out_a, torch_out(ckpt, a, inputs), rtol=1e-4, atol=1e-4)
    assert (out_a - base_out).abs().max() > 1e-2  # the change is visible

    plan_b = session.apply_deltas(("B", 1.0), b, base)
    assert plan_b is not None and plan_b.restored == frozenset(set(a) - set(b))
    torch.testing.assert_close(run(session, inputs), torch_out(ckpt, b, inputs), rtol=1e-4, atol=1e-4)

    session.apply_deltas(("A", 0.8), a, base)
    assert torch.equal(run(session, inputs), out_a)  # bit-identical: nothing drifted
    session.apply_deltas((), {}, base)
    assert torch.equal(run(session, inputs), base_out)


def test_unchanged_set_does_no_refit(engine, session: EngineSession, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ckpt = engine[0]
    sd = read_unet_state_dict(ckpt)
    a = changed_weights(sd, [n for n in sd if n.endswith("to_k.weight")][:1], 3)
    calls: list[int] = []
    real = session.runner.refit
    monkeypatch.setattr(session.runner, "refit", lambda w, fill=None: (calls.append(len(w)), real(w, fill))[1])
    session.apply_deltas("k", a, base_loader(ckpt))
    assert session.apply_deltas("k", a, base_loader(ckpt)) is None
    assert calls == [1]


def test_updates_naming_no_engine_weight_change_nothing(engine, session: EngineSession) -> None:  # type: ignore[no-untyped-def]
    ckpt = engine[0]
    inputs = (torch.ones(1, 4, 8, 8), torch.tensor([500.0]), torch.ones(1, 77, 768))
    before = run(session, inputs).clone()
    with pytest.raises(RefitError, match="name no engine weight"):
        session.apply_deltas("x", {"input_blocks.99.weight": torch.zeros(1)}, base_loader(ckpt))
    sd = read_unet_state_dict(ckpt)
    name = next(n for n in sd if n.endswith("to_q.weight"))
    with pytest.raises(RefitError, match="shape"):
        session.apply_deltas("y", {name: torch.zeros(3, 3)}, base_loader(ckpt))
    assert torch.equal(run(session, inputs), before)
    assert session.deltas.key == ()


def test_tracker_plans_only_what_changes() -> None:
    base = {"a": torch.zeros(2), "b": torch.ones(2), "c": torch.full((2,), 2.0)}
    def loader(names): return {n: base[n] for n in names}  # type: ignore[no-untyped-def]
    t = WeightTracker()
    p1 = t.plan("one", {"a": torch.tensor([5.0, 5.0])}, loader)
    assert p1 is not None and set(p1.weights) == {"a"}
    t.applied(p1)
    p2 = t.plan("two", {"b": torch.tensor([7.0, 7.0])}, loader)
    assert p2 is not None and set(p2.weights) == {"a", "b"} and p2.restored == {"a"}
    assert torch.equal(p2.weights["a"], base["a"])
    t.applied(p2)
    assert t.plan("two", {"b": torch.tensor([7.0, 7.0])}, loader) is None
    assert merge(torch.ones(2, 2, dtype=torch.float16), torch.full((4,), 0.5)).dtype == torch.float16
    with pytest.raises(ValueError, match="does not fit"):
        merge(torch.ones(2, 2), torch.ones(3))


def test_a_rejected_refit_keeps_the_engine_usable_a_failed_one_marks_it_for_reload() -> None:
    """A backend that cannot undo a refit (TensorRT) says when it refused before touching the engine
    (RefitRejected): then the weights are still the previous ones; any other failure means they are unknown."""
    from sdtrt.errors import RefitError, RefitRejected
    from sdtrt.serving.session import EngineSession

    class Runner:
        refit_is_atomic = False

        def __init__(self, error: Exception) -> None:
            self.error = error

        def refit(self, weights: object, fill: object = None) -> None:
            raise self.error

    rejected = EngineSession(None, Runner(RefitRejected("no weights named x")), None)  # type: ignore[arg-type]
    with pytest.raises(RefitRejected):
        rejected._refit({})
    assert rejected.weights_unknown is None
    failed = EngineSession(None, Runner(RefitError("refit failed")), None)  # type: ignore[arg-type]
    with pytest.raises(RefitError):
        failed._refit({})
    assert failed.weights_unknown is not None and "refit failed" in failed.weights_unknown
