"""Token tasks: no leakage from later tokens, masking, and the curriculum weights."""

from __future__ import annotations

import pytest
import torch

from tokenunify.model.emmamba import EMmamba, preset
from tokenunify.objectives import CurriculumConfig, ObjectiveConfig, TokenObjective, task_weights
from tokenunify.objectives.token_tasks import patchify, path_order

CROP, PATCH = (16, 32, 32), (4, 16, 16)  # 4 x 2 x 2 = 16 tokens


@pytest.fixture(scope="module")
def objective():
    torch.manual_seed(0)
    obj = TokenObjective(EMmamba(preset("tiny")), CROP, PATCH, ObjectiveConfig())
    return obj.eval()


def _set_tokens(x, tokens, value):
    t = patchify(x, PATCH).clone()
    t[:, tokens] = value
    from tokenunify.tokenize import unpatchify
    return torch.from_numpy(unpatchify(t[0].numpy(), CROP, PATCH))[None, None].float()


@pytest.mark.parametrize("path", ["zyx", "xyz"])
def test_next_and_next_all_cannot_see_later_tokens(path):
    torch.manual_seed(0)
    obj = TokenObjective(EMmamba(preset("tiny")), CROP, PATCH, ObjectiveConfig(path=path)).eval()
    order = path_order(obj.grid, path)
    x = torch.randn(1, 1, *CROP)
    k = torch.tensor([6])
    later = order[6:]  # tokens pi(>=k)
    x2 = _set_tokens(x, later, 5.0)  # change everything from pi(k) on
    x3 = _set_tokens(x, order[5:6], 5.0)  # change a visible token
    with torch.no_grad():
        out = [obj.predict_prefix(obj.prefix_inputs(v, [11], k)[0]) for v in (x, x2, x3)]
    tok = order[6]
    torch.testing.assert_close(out[0][0][:, tok], out[1][0][:, tok])  # next token: same
    torch.testing.assert_close(out[0][1], out[1][1])  # next-all: same
    assert not torch.allclose(out[0][0][:, tok], out[2][0][:, tok])  # a visible change shows


def test_random_masking_replaces_the_chosen_fraction(objective):
    x = torch.randn(2, 1, *CROP)
    x_in, mask = objective.random_inputs(x, [1, 2])
    assert mask.sum(1).tolist() == [6, 6]  # round(0.4 * 16)
    changed = (patchify(x_in, PATCH) != patchify(x, PATCH)).any(-1)
    assert torch.equal(changed, mask)
    again, mask2 = objective.random_inputs(x, [1, 2])
    assert torch.equal(again, x_in) and torch.equal(mask, mask2)  # seeded per sample


def test_losses_are_finite_and_tasks_selectable(objective):
    x = torch.randn(2, 1, *CROP)
    total, parts = objective(x, [3, 4], task_weights(0.5))
    assert set(parts) == {"random", "next", "next_all"} and torch.isfinite(total)
    mae = TokenObjective(EMmamba(preset("tiny")), CROP, PATCH, tasks=("random",))
    _, parts = mae(x, [3, 4], task_weights(0.5, active=("random",)))
    assert set(parts) == {"random"} and not hasattr(mae, "resampler")


@pytest.mark.parametrize("t, dominant", [(0.05, "random"), (0.15, "random"), (0.5, "next"),
                                         (0.6, "next"), (0.85, "next_all"), (1.0, "next_all")])
def test_curriculum_phases(t, dominant):
    w = task_weights(t)
    assert sum(w.values()) == pytest.approx(1.0)
    assert max(w, key=w.get) == dominant
    assert w[dominant] == pytest.approx(0.73, abs=0.02)
    others = sorted(v for k, v in w.items() if k != dominant)
    assert others[0] == pytest.approx(0.09, abs=0.02) and others[1] == pytest.approx(0.18, abs=0.02)


def test_curriculum_is_smooth_and_configurable():
    ts = torch.linspace(0, 1, 201).tolist()
    seq = [task_weights(t)["next"] for t in ts]
    assert max(abs(a - b) for a, b in zip(seq, seq[1:], strict=False)) < 0.1  # no jumps
    assert min(min(task_weights(t).values()) for t in ts) > 0.05  # auxiliaries never vanish
    w = task_weights(0.3, CurriculumConfig())
    assert w["random"] == pytest.approx(w["next"])  # the boundary is the midpoint
    custom = CurriculumConfig(boundaries=(0.5, 0.9), dominant=0.6, auxiliary=(0.3, 0.1))
    assert task_weights(0.4, custom)["random"] == pytest.approx(0.6, abs=0.02)
    assert task_weights(0.4, custom, active=("random",)) == {"random": 1.0}
    with pytest.raises(ValueError, match="boundaries"):
        CurriculumConfig(boundaries=(0.7, 0.3))
