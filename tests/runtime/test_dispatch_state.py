"""Dispatcher.observe / state / restore: the hysteresis state carried across chunks is exact."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from runtime.dispatch import Dispatcher
from runtime.engines.fake import FakeEngine
from runtime.policies import LatencyTable
from tests.runtime.conftest import make_manifest

LADDER = {"lo": ((-1,), 4.0), "mid": ((0,), 6.0), "hi": ((1,), 8.0), "ref": ((), 32.0)}
LATENCIES = LatencyTable({"lo": 1.0, "mid": 2.0, "hi": 3.0, "ref": 4.0})
Frame = npt.NDArray[np.uint8]


def wandering(count: int, seed: int = 0) -> list[Frame]:
    """Frames whose per-tile complexity drifts around the thresholds (10 and 40)."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        strength = np.kron(rng.random((3, 4, 1)), np.ones((16, 16, 1))) * (0.05 + 0.05 * (
            index % 5))
        noise = rng.random((48, 64, 3)) * strength
        frames.append(np.round(np.clip(0.4 + noise, 0, 1) * 255).astype(np.uint8))
    return frames


def dispatcher(policy: str) -> Dispatcher:
    manifest = make_manifest(LADDER, tile=16, overlap=4, scale=2)
    engines = {name: FakeEngine(name, 2, 16, bias=i / 255) for i, name in
               enumerate(manifest.names)}
    return Dispatcher(manifest, engines, policy=policy, hysteresis=0.3, latencies=LATENCIES)


@pytest.mark.parametrize("policy", ["threshold", "budget:35"])
def test_a_restored_state_continues_exactly_as_one_run(policy: str) -> None:
    frames = wandering(24)
    with dispatcher(policy) as whole:
        expected = [whole.upscale(frame) for frame in frames]
    cut = 9
    observer = dispatcher(policy)  # engines never activated: observe runs none
    for frame in frames[:cut]:
        observer.observe(frame)
    state = observer.state
    assert state is not None and (state.height, state.width) == (48, 64)
    with dispatcher(policy) as second:
        second.restore(state)
        rest = [second.upscale(frame) for frame in frames[cut:]]
        second.restore(None)  # a reset: the next frame is chosen without history
        fresh = second.upscale(frames[cut])
    for got, want in zip(rest, expected[cut:], strict=True):
        assert got.engines == want.engines and np.array_equal(got.sr, want.sr)
    with dispatcher(policy) as alone:
        assert fresh.engines == alone.upscale(frames[cut]).engines
    # without the state the chunk would start differently: the clip exercises the hysteresis
    with dispatcher(policy) as reset:
        restarted = [reset.upscale(frame).engines for frame in frames[cut:]]
    assert restarted != [want.engines for want in expected[cut:]]


def test_state_is_none_before_a_frame_and_follows_upscale() -> None:
    frames = wandering(3, seed=1)
    with dispatcher("threshold") as one:
        assert one.state is None
        one.upscale(frames[0])
        state = one.state
        assert state is not None and state.offsets is not None and state.rungs is None
        observer = dispatcher("threshold")
        observer.observe(frames[0])
        observed = observer.state
        assert observed is not None and observed.offsets is not None
        assert np.array_equal(observed.offsets, state.offsets)
