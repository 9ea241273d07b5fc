"""A planner's normalizer held against the model's: CleanDiffuser's Gaussian and diffuser / Decision
Diffuser's CDF normalizers, a mismatch named by dimension, and predict_normalized converting their states."""

import numpy as np
import pytest
import torch
from helpers.planners import CDFNormalizer, CleanDiffuserGaussianNormalizer, DatasetNormalizer

import invdyn
from invdyn import NormalizerMismatchError

OBS_DIM = 6


@pytest.fixture(scope="module")
def data():
    """Observations with skewed, heavy-tailed and constant dimensions, as float32 like D4RL's files."""
    rng = np.random.default_rng(0)
    n = 4000
    x = np.stack(
        [
            rng.normal(1.0, 2.0, n),
            rng.exponential(1.5, n),
            rng.standard_t(3, n),
            rng.uniform(-3, 5, n),
            np.full(n, 0.25),
            rng.normal(-4.0, 0.1, n),
        ],
        axis=1,
    )
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    torch.manual_seed(0)
    net = invdyn.FancyMlpInvDynamic(OBS_DIM, 2, hidden_dim=16)
    norm = invdyn.GaussianNormalizer.from_data(data)  # what the trainer fits: all observations, float64
    return invdyn.read_model_dir(invdyn.save_model_dir(tmp_path_factory.mktemp("m") / "m-v0", net, norm))


def test_cleandiffusers_normalizer_of_the_same_data_passes(model, data):
    planner = CleanDiffuserGaussianNormalizer(data)  # float32 statistics of the same observations
    model.normalizer.check(planner)
    model.normalizer.check(planner.mean, planner.std)
    model.normalizer.check((planner.mean, planner.std))


def test_a_planner_trained_on_other_data_is_caught_by_dimension(model, data):
    other = data.copy()
    other[:, 1] *= 1.3  # another dataset: two dimensions' statistics moved
    other[:, 5] += 0.05
    with pytest.raises(NormalizerMismatchError) as e:
        model.normalizer.check(CleanDiffuserGaussianNormalizer(other))
    msg = str(e.value)
    assert "2 of 6 dims differ, [1, 5]" in msg and "dim 1: model mean" in msg and "dim 5:" in msg
    assert "dim 0:" not in msg and "normalizer=planner_normalizer" in msg


def test_a_planner_for_another_environment_is_caught(model, data):
    with pytest.raises(
        NormalizerMismatchError, match="normalizes 5-dim observations but the model's obs_dim is 6"
    ):
        model.normalizer.check(CleanDiffuserGaussianNormalizer(data[:, :5]))
    with pytest.raises(NormalizerMismatchError, match="normalizes 5-dim"):
        model.normalizer.check(CDFNormalizer(data[:, :5]))


@pytest.mark.parametrize("wrap", ["cdf", "dataset"])
def test_decision_diffusers_cdf_normalizer_is_caught(model, data, wrap):
    """Fit on the very same observations, a CDF normalization is still not (x - mean) / std: feeding its
    states to predict_normalized as they are would be wrong, in every dimension (diffuser leaves a constant
    dimension as it is, 0.25 here, where (x - mean) / std gives 0)."""
    planner = CDFNormalizer(data) if wrap == "cdf" else DatasetNormalizer({"observations": data})
    with pytest.raises(NormalizerMismatchError) as e:
        model.normalizer.check(planner)
    assert "CDFNormalizer" in str(e.value) and "6 of 6 dims differ, [0, 1, 2, 3, 4, 5]" in str(e.value)


@pytest.mark.parametrize("kind", ["gaussian-other-data", "cdf", "dataset"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_predict_normalized_converts_the_planners_states(model, data, kind, as_tensor):
    other = data * 1.1 + 0.3
    planner = {
        "gaussian-other-data": CleanDiffuserGaussianNormalizer(other),
        "cdf": CDFNormalizer(data),
        "dataset": DatasetNormalizer({"observations": data}),
    }[kind]
    obs_norm = planner.normalizers["observations"] if kind == "dataset" else planner
    rows = data[:64].reshape(8, 8, OBS_DIM)  # (B, H, obs_dim): a planner's trajectories
    obs, nxt = obs_norm.normalize(rows[:, :-1]), obs_norm.normalize(rows[:, 1:])
    expected = model.predict(rows[:, :-1], rows[:, 1:])
    if as_tensor:
        obs, nxt = torch.from_numpy(np.ascontiguousarray(obs)), torch.from_numpy(np.ascontiguousarray(nxt))
    got = model.predict_normalized(obs, nxt, normalizer=planner)
    assert isinstance(got, torch.Tensor) == as_tensor
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    if kind == "cdf":  # what the conversion saves a planner from
        assert not np.allclose(model.predict_normalized(obs, nxt), expected, atol=1e-2)


def test_not_a_normalizer_is_a_type_error(model):
    with pytest.raises(TypeError, match="not a normalizer"):
        model.normalizer.check(object())
    with pytest.raises(NormalizerMismatchError, match="mean has 6 dims but its std has 5"):
        model.normalizer.check(np.zeros(6), np.ones(5))
