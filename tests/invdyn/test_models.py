"""Networks and normalizer: CleanDiffuser's layout, predict on numpy / torch of any leading shape, clear
errors."""

import numpy as np
import pytest
import torch

import invdyn
from invdyn import FancyMlpInvDynamic, GaussianNormalizer, MlpInvDynamic


def test_state_dict_keys_match_cleandiffuser():
    fancy = FancyMlpInvDynamic(11, 3, hidden_dim=8)
    assert sorted({k.rsplit(".", 1)[0] for k in fancy.state_dict()}) == [
        "mlp.0",
        "mlp.1",
        "mlp.4",
        "mlp.5",
        "mlp.7",
    ]
    bare = FancyMlpInvDynamic(11, 3, hidden_dim=8, add_norm=False, add_dropout=False)
    assert sorted({k.rsplit(".", 1)[0] for k in bare.state_dict()}) == ["mlp.0", "mlp.4", "mlp.7"]
    plain = MlpInvDynamic(11, 3, hidden_dim=8)
    assert sorted({k.rsplit(".", 1)[0] for k in plain.state_dict()}) == ["mlp.0", "mlp.2", "mlp.4"]
    assert fancy.config == {
        "obs_dim": 11,
        "act_dim": 3,
        "hidden_dim": 8,
        "tanh_out_activation": True,
        "action_scale": 1.0,
        "add_norm": True,
        "add_dropout": True,
    }
    assert isinstance(fancy.mlp[3], torch.nn.Dropout) and fancy.mlp[3].p == 0.1
    assert FancyMlpInvDynamic(11, 3, hidden_dim=8, dropout=0.3).mlp[3].p == 0.3


def test_action_scale_and_tanh():
    torch.manual_seed(0)
    net = FancyMlpInvDynamic(4, 2, hidden_dim=8, action_scale=2.5).eval()
    x = torch.randn(64, 4) * 10
    out = net.predict(x, -x)
    assert out.abs().max() <= 2.5 and out.abs().max() > 1.0
    raw = FancyMlpInvDynamic(4, 2, hidden_dim=8, tanh_out_activation=False, action_scale=2.5)
    raw.load_state_dict(net.state_dict())
    raw.eval()
    np.testing.assert_allclose(
        torch.tanh(raw.predict(x, -x)) * 2.5, out, atol=1e-6
    )  # scale applies only with tanh


@pytest.mark.parametrize("lead", [(), (7,), (3, 5)])
def test_predict_numpy_and_torch_any_leading_shape(lead):
    torch.manual_seed(0)
    net = FancyMlpInvDynamic(6, 2, hidden_dim=16).eval()
    rng = np.random.default_rng(0)
    obs, nxt = rng.normal(size=(*lead, 6)), rng.normal(size=(*lead, 6))  # float64 in on purpose
    out = net.predict(obs, nxt)
    assert isinstance(out, np.ndarray) and out.shape == (*lead, 2) and out.dtype == np.float32
    t_out = net.predict(torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(nxt, dtype=torch.float32))
    assert isinstance(t_out, torch.Tensor) and not t_out.requires_grad
    np.testing.assert_allclose(t_out.numpy(), out, atol=1e-6)
    flat = net(
        torch.as_tensor(obs.reshape(-1, 6), dtype=torch.float32), torch.as_tensor(nxt.reshape(-1, 6)).float()
    )
    np.testing.assert_allclose(out.reshape(-1, 2), flat.detach().numpy(), atol=1e-6)


def test_wrong_input_dimension_names_expected_dim():
    net = MlpInvDynamic(6, 2, hidden_dim=8)
    with pytest.raises(invdyn.ShapeError, match=r"obs has last dimension 5.*obs_dim=6"):
        net.predict(np.zeros((4, 5)), np.zeros((4, 5)))
    with pytest.raises(invdyn.ShapeError, match=r"next_obs .*obs_dim=6"):
        net.predict(np.zeros((4, 6)), torch.zeros(4, 7))
    with pytest.raises(invdyn.ShapeError, match="differ"):
        net.predict(np.zeros((4, 6)), np.zeros((3, 6)))
    with pytest.raises(invdyn.ShapeError, match="obs_dim=6"):
        net.predict(np.float32(1.0), np.float32(1.0))
    with pytest.raises(ValueError, match="hidden_dim"):
        MlpInvDynamic(6, 2, hidden_dim=0)
    with pytest.raises(ValueError, match="dropout"):
        FancyMlpInvDynamic(6, 2, dropout=1.0)


def test_normalizer():
    data = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0]])
    norm = GaussianNormalizer.from_data(data)
    np.testing.assert_allclose(norm.std, [1.0, 1.0, 1.0])  # the constant column's std 0 became 1
    np.testing.assert_allclose(norm.mean, [2.0, 5.0, 3.0])
    z = norm.normalize(data.astype(np.float32))
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, [[-1, 0, -1], [1, 0, 1]])
    np.testing.assert_allclose(norm.unnormalize(z), data)
    t = norm.normalize(torch.tensor(data, dtype=torch.float32).reshape(1, 2, 3))
    assert isinstance(t, torch.Tensor) and t.shape == (1, 2, 3)
    np.testing.assert_allclose(norm.normalize(torch.tensor([[3, 5, 4]])).numpy(), [[1.0, 0.0, 1.0]])
    again = GaussianNormalizer.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again.mean, norm.mean)
    with pytest.raises(ValueError, match="last dimension 3"):
        norm.normalize(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        GaussianNormalizer([0.0, np.nan], [1.0, 1.0])
