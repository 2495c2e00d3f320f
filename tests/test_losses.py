"""DPO loss family and sequence log-probs against hand-computed values."""

import mlx_cai.backend  # noqa: F401  (OpenBLAS before mlx.core)

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_cai.losses import LOSSES, dpo_loss, log_sigmoid, sequence_logps

approx = pytest.approx

# Batch of 3 pairs. h = (pc - rc) - (pr - rr):
#   ex0: (-10 + 10.5) - (-11 + 10.8) = 0.5 - (-0.2) =  0.7
#   ex1: (-12 + 11.0) - (-10 + 10.4) = -1  -   0.4  = -1.4
#   ex2: ( -8 +  8.2) - ( -9 +  8.6) = 0.2 - (-0.4) =  0.6
PC = [-10.0, -12.0, -8.0]
PR = [-11.0, -10.0, -9.0]
RC = [-10.5, -11.0, -8.2]
RR = [-10.8, -10.4, -8.6]
H = [0.7, -1.4, 0.6]
BETA = 0.5


def _ls(x):  # log sigmoid, in plain math
    return -math.log1p(math.exp(-x))


def _mean(xs):
    return sum(xs) / len(xs)


def _arrays():
    return tuple(mx.array(v) for v in (PC, PR, RC, RR))


def _loss(loss_type, **kw):
    loss, metrics = dpo_loss(*_arrays(), beta=BETA, loss_type=loss_type, **kw)
    return loss.item(), {k: v.item() for k, v in metrics.items()}


def test_hand_h_matches_inputs():
    for pc, pr, rc, rr, h in zip(PC, PR, RC, RR, H):
        assert (pc - rc) - (pr - rr) == approx(h)


def test_sigmoid_hand_computed():
    # d = 0.5 * h = [0.35, -0.7, 0.3]; loss = mean(-log sigmoid(d))
    expected = _mean([-_ls(BETA * h) for h in H])
    assert _loss("sigmoid")[0] == approx(expected, rel=1e-5)


def test_sigmoid_label_smoothing_hand_computed():
    eps = 0.1
    expected = _mean([-(1 - eps) * _ls(BETA * h) - eps * _ls(-BETA * h) for h in H])
    assert _loss("sigmoid", label_smoothing=eps)[0] == approx(expected, rel=1e-5)


def test_label_smoothing_zero_equals_plain_sigmoid():
    plain = _mean([-_ls(BETA * h) for h in H])
    assert _loss("sigmoid", label_smoothing=0.0)[0] == approx(plain, rel=1e-5)
    assert _loss("sigmoid", label_smoothing=0.0)[0] == approx(_loss("sigmoid")[0], rel=1e-6)
    # robust with eps = 0 also reduces to plain sigmoid
    assert _loss("robust", label_smoothing=0.0)[0] == approx(plain, rel=1e-5)


def test_ipo_hand_computed():
    # 1 / (2 * 0.5) = 1 -> mean((0.7-1)^2, (-1.4-1)^2, (0.6-1)^2) = (0.09 + 5.76 + 0.16) / 3
    assert _loss("ipo")[0] == approx((0.09 + 5.76 + 0.16) / 3, rel=1e-5)


def test_hinge_hand_computed():
    # relu(1 - d), d = [0.35, -0.7, 0.3] -> [0.65, 1.7, 0.7], mean = 3.05 / 3
    assert _loss("hinge")[0] == approx(3.05 / 3, rel=1e-5)
    # a large positive margin is clipped to 0
    big = dpo_loss(
        mx.array([0.0]), mx.array([-10.0]), mx.array([0.0]), mx.array([0.0]), beta=1.0, loss_type="hinge"
    )[0]
    assert big.item() == 0.0


def test_robust_hand_computed():
    eps = 0.2
    expected = _mean(
        [(-(1 - eps) * _ls(BETA * h) + eps * _ls(-BETA * h)) / (1 - 2 * eps) for h in H]
    )
    assert _loss("robust", label_smoothing=eps)[0] == approx(expected, rel=1e-5)


def test_robust_rejects_half():
    with pytest.raises(ValueError):
        dpo_loss(*_arrays(), loss_type="robust", label_smoothing=0.5)


def test_label_smoothing_out_of_range():
    with pytest.raises(ValueError):
        dpo_loss(*_arrays(), label_smoothing=0.6)


def test_metrics_values_and_keys():
    _, m = _loss("sigmoid")
    assert set(m) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "loss/dpo",
        "loss/nll",
    }
    # chosen rewards 0.5 * [0.5, -1.0, 0.2] = [0.25, -0.5, 0.1]
    # rejected rewards 0.5 * [-0.2, 0.4, -0.4] = [-0.1, 0.2, -0.2]
    assert m["rewards/chosen"] == approx((0.25 - 0.5 + 0.1) / 3, rel=1e-5)
    assert m["rewards/rejected"] == approx((-0.1 + 0.2 - 0.2) / 3, rel=1e-5)
    assert m["rewards/accuracies"] == approx(2 / 3)  # ex0, ex2 have chosen > rejected
    assert m["rewards/margins"] == approx(BETA * sum(H) / 3, rel=1e-5)
    assert m["logps/chosen"] == approx(-30.0 / 3)
    assert m["logps/rejected"] == approx(-30.0 / 3)
    assert m["loss/nll"] == 0.0


def test_nll_term_added():
    nll = mx.array([1.0, 2.0, 4.5])  # mean 2.5
    base, _ = _loss("sigmoid")
    loss, m = dpo_loss(*_arrays(), beta=BETA, nll_alpha=0.2, chosen_nll=nll)
    assert loss.item() == approx(base + 0.2 * 2.5, rel=1e-5)
    assert m["loss/nll"].item() == approx(2.5)
    assert m["loss/dpo"].item() == approx(base, rel=1e-6)
    # logged even when unweighted
    loss0, m0 = dpo_loss(*_arrays(), beta=BETA, chosen_nll=nll)
    assert loss0.item() == approx(base, rel=1e-6)
    assert m0["loss/nll"].item() == approx(2.5)


def test_nll_alpha_without_nll_raises():
    with pytest.raises(ValueError):
        dpo_loss(*_arrays(), nll_alpha=0.1)


def test_unknown_loss_type_lists_known():
    with pytest.raises(ValueError) as err:
        dpo_loss(*_arrays(), loss_type="kto")
    for name in LOSSES:
        assert name in str(err.value)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_gradients_finite_and_nonzero(loss_type):
    pc, pr, rc, rr = _arrays()

    def f(pc, pr):
        return dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=0.1)[0]

    g_c, g_r = mx.grad(f, argnums=(0, 1))(pc, pr)
    for g in (g_c, g_r):
        assert g.shape == (3,)
        assert mx.all(mx.isfinite(g)).item()
        assert mx.any(g != 0).item()
    # every variant depends on pc and pr only through h, so the gradients are opposite
    assert np.allclose(np.array(g_c), -np.array(g_r), atol=1e-6)


def test_sigmoid_gradient_hand_computed():
    # dL/dpc_i = -beta * sigmoid(-d_i) / B   (d/dx -log sigmoid(x) = -sigmoid(-x))
    pc, pr, rc, rr = _arrays()
    g = mx.grad(lambda pc: dpo_loss(pc, pr, rc, rr, beta=BETA)[0])(pc)
    expected = [-BETA / (1 + math.exp(BETA * h)) / 3 for h in H]
    assert np.allclose(np.array(g), expected, rtol=1e-5)


def test_metrics_carry_no_gradient():
    pc, pr, rc, rr = _arrays()
    g = mx.grad(lambda pc: dpo_loss(pc, pr, rc, rr)[1]["rewards/margins"])(pc)
    assert mx.all(g == 0).item()


def test_log_sigmoid_stable_at_extremes():
    x = mx.array([-1000.0, 0.0, 1000.0])
    y = np.array(log_sigmoid(x))
    assert np.all(np.isfinite(y))
    assert y == approx([-1000.0, math.log(0.5), 0.0], abs=1e-6)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_works_under_compile(loss_type):
    kw = dict(beta=BETA, loss_type=loss_type, label_smoothing=0.1, nll_alpha=0.3)
    nll = mx.array([1.0, 2.0, 4.5])

    def f(pc, pr, rc, rr, nll):
        return dpo_loss(pc, pr, rc, rr, chosen_nll=nll, **kw)

    eager_loss, eager_m = f(*_arrays(), nll)
    comp_loss, comp_m = mx.compile(f)(*_arrays(), nll)
    assert comp_loss.item() == approx(eager_loss.item(), rel=1e-5)
    for k in eager_m:
        assert comp_m[k].item() == approx(eager_m[k].item(), rel=1e-5, abs=1e-7)
    # and the compiled gradient
    g = mx.compile(mx.grad(lambda pc, *rest: f(pc, *rest)[0]))(*_arrays(), nll)
    assert mx.all(mx.isfinite(g)).item()


# ---------------------------------------------------------------- sequence_logps


def test_sequence_logps_matches_manual_loop():
    rng = np.random.default_rng(0)
    B, T, V = 2, 4, 5
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    mask = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])

    expected_sum, expected_n = [], []
    for b in range(B):
        s = 0.0
        for t in range(T):
            if mask[b, t]:
                row = [float(v) for v in logits[b, t]]
                s += row[targets[b, t]] - math.log(sum(math.exp(v) for v in row))
        expected_sum.append(s)
        expected_n.append(float(mask[b].sum()))

    sums, n = sequence_logps(mx.array(logits), mx.array(targets), mx.array(mask))
    assert sums.shape == (B,) and n.shape == (B,)
    assert np.allclose(np.array(sums), expected_sum, atol=1e-5)
    assert np.array(n).tolist() == expected_n


def test_sequence_logps_ignores_masked_targets_and_bf16():
    rng = np.random.default_rng(1)
    logits = mx.array(rng.normal(size=(1, 3, 6)).astype(np.float32))
    mask = mx.array([[1, 1, 0]])
    ok = sequence_logps(logits, mx.array([[2, 3, 0]]), mask)[0]
    # -100 (ignore id) under mask 0 must neither crash nor change the sum
    ignored = sequence_logps(logits, mx.array([[2, 3, -100]]), mask)[0]
    assert np.allclose(np.array(ok), np.array(ignored))
    # bf16 logits are upcast; result is float32 and close to the float32 path
    half = sequence_logps(logits.astype(mx.bfloat16), mx.array([[2, 3, 0]]), mask)[0]
    assert half.dtype == mx.float32
    assert np.allclose(np.array(half), np.array(ok), atol=5e-2)


def test_sequence_logps_all_masked_is_zero():
    logits = mx.zeros((2, 3, 4))
    sums, n = sequence_logps(logits, mx.zeros((2, 3), dtype=mx.int32), mx.zeros((2, 3)))
    assert np.array(sums).tolist() == [0.0, 0.0]
    assert np.array(n).tolist() == [0.0, 0.0]
