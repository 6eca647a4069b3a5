"""Hand-computed checks of the CARE reward, group advantages and the GRPO loss (care.py)."""

import math

import torch

import care


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def logs(ps):
    return torch.log(t(ps))


def span(g, off=()):
    s = torch.ones(1, g, dtype=torch.bool)
    for i in off:
        s[0, i] = False
    return s


# -----------------------------------------------------------------------------
# consistency bonus


def test_all_wrong_group_gets_no_bonus():
    acc, fmt = t([[0.0, 0.0, 0.0, 0.0]]), t([[1.0, 1.0, 0.0, 1.0]])
    out = care.care_rewards(acc, fmt, logs([[0.9, 0.5, 0.8, 0.3]]), span(4))
    # H is empty (nobody has acc > 0.1): no bonus, no NaN from an empty mean
    assert not out["high_acc"].any() and not out["consistent"].any()
    assert torch.equal(out["bonus"], torch.zeros(1, 4, dtype=torch.float64))
    assert torch.equal(out["reward"], fmt)


def test_all_correct_group_bonus_separates():
    acc, p = t([[1.0, 1.0, 1.0, 1.0]]), t([[0.9, 0.5, 0.8, 0.3]])
    # mean acc = 1, acc >= mean for all -> H = all; mu = (0.9+0.5+0.8+0.3)/4 = 0.625
    # C = {p >= 0.625} = {0, 2}
    bonus, consistent = care.consistency_bonus(acc, p, span(4))
    assert consistent.tolist() == [[True, False, True, False]]
    assert torch.allclose(bonus, t([[0.5, 0.0, 0.5, 0.0]]))
    # through the log-prob interface: rewards 1 + 1 + bonus -> [2.5, 2, 2.5, 2]
    out = care.care_rewards(acc, torch.ones_like(acc), torch.log(p), span(4))
    assert torch.allclose(out["reward"], t([[2.5, 2.0, 2.5, 2.0]]))
    # plain GRPO would give all 2 -> zero advantage; CARE gives a signal
    assert torch.equal(care.grpo_rewards(acc, torch.ones_like(acc))["reward"], t([[2.0] * 4]))
    assert care.group_advantages(out["reward"]).abs().min() > 0.5
    # equal confidences are all consistent, even where the float mean rounds above them
    # (mean([0.2]*3) = 0.2 + 3e-17 in float64)
    _, consistent = care.consistency_bonus(t([[1.0] * 3]), t([[0.2] * 3]), span(3))
    assert consistent.all()


def test_mixed_group_mean_over_correct_only():
    acc = t([[1.0, 0.0, 1.0, 1.0, 0.0]])
    fmt = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    p = t([[0.65, 0.95, 0.8, 0.3, 0.9]])
    # mean acc = 0.6 -> H = {0, 2, 3}; mu = (0.65+0.8+0.3)/3 = 0.5833
    # C & H = {0 (0.65), 2 (0.8)}; wrong samples 1 and 4 never get a bonus despite high p.
    # (a mean over all five, 0.72, would wrongly drop sample 0)
    out = care.care_rewards(acc, fmt, torch.log(p), span(5))
    assert out["high_acc"].tolist() == [[True, False, True, True, False]]
    assert out["consistent"].tolist() == [[True, False, True, False, False]]
    assert torch.allclose(out["bonus"], t([[0.5, 0.0, 0.5, 0.0, 0.0]]))
    # r = acc + fmt + bonus = [2.5, 1, 2.5, 2, 0]: binary acc -> values in {0, 1, 2, 2.5}
    assert torch.allclose(out["reward"], t([[2.5, 1.0, 2.5, 2.0, 0.0]]))
    assert set(out["reward"].flatten().tolist()) <= {0.0, 1.0, 2.0, 2.5}


def test_margin():
    acc, p = t([[1.0, 1.0, 0.0, 0.0]]), t([[0.605, 0.595, 0.1, 0.9]])
    # H = {0, 1} (mean acc 0.5), mu = 0.6; sample 1 sits at mu - 0.005
    _, c0 = care.consistency_bonus(acc, p, span(4), margin=0.0)
    _, c1 = care.consistency_bonus(acc, p, span(4), margin=0.01)
    assert c0.tolist() == [[True, False, False, False]]
    assert c1.tolist() == [[True, True, False, False]]


def test_confidence_cap():
    acc = t([[1.0, 1.0, 0.0, 0.0]])
    l = logs([[0.97, 0.99, 0.2, 0.2]])
    # cap 0.95: p = [0.95, 0.95, 0.2, 0.2]; H = {0, 1}, mu = 0.95 -> both consistent
    out = care.care_rewards(acc, torch.zeros_like(acc), l, span(4))
    assert torch.allclose(out["ref_conf"], t([[0.95, 0.95, 0.2, 0.2]]))
    assert out["consistent"].tolist() == [[True, True, False, False]]
    # no cap: mu = (0.97+0.99)/2 = 0.98 -> only sample 1
    out = care.care_rewards(acc, torch.zeros_like(acc), l, span(4), conf_cap=1.0)
    assert out["consistent"].tolist() == [[False, True, False, False]]


def test_non_binary_accuracy():
    acc, p = t([[0.05, 0.6, 0.3, 0.9]]), t([[0.99, 0.8, 0.9, 0.6]])
    # mean acc = 1.85/4 = 0.4625 -> H = {1, 3}; mu = (0.8+0.6)/2 = 0.7 -> C & H = {1}
    # bonus = 0.5 * acc = 0.5 * 0.6 = 0.3 (not a flat 0.5)
    assert care.high_accuracy_mask(acc, span(4)).tolist() == [[False, True, False, True]]
    bonus, consistent = care.consistency_bonus(acc, p, span(4))
    assert consistent.tolist() == [[False, True, False, False]]
    assert torch.allclose(bonus, t([[0.0, 0.3, 0.0, 0.0]]))
    # the > 0.1 rule: acc [0.05, 0.05, 0, 0] has mean 0.025, but 0.05 is not "high"
    assert not care.high_accuracy_mask(t([[0.05, 0.05, 0.0, 0.0]]), span(4)).any()
    # equal non-binary accuracies are all >= their own mean; naively, mean([0.2]*3) in
    # float64 rounds to 0.2 + 3e-17 and would put nobody in H
    assert care.high_accuracy_mask(t([[0.2, 0.2, 0.2]]), span(3)).all()


def test_samples_without_answer_span_excluded():
    acc = t([[1.0, 1.0, 1.0, 1.0]])
    l = t([[math.log(0.6), math.log(0.8), float("nan"), math.log(0.7)]])
    # sample 2 has no span: p = 0, not in H. H = {0, 1, 3}, mu = (0.6+0.8+0.7)/3 = 0.7
    # -> C & H = {1, 3}. (Counting sample 2 in H would give mu = 0.525 and reward sample 0.)
    out = care.care_rewards(acc, torch.ones_like(acc), l, span(4, off=[2]))
    assert torch.allclose(out["ref_conf"], t([[0.6, 0.8, 0.0, 0.7]]))
    assert out["high_acc"].tolist() == [[True, True, False, True]]
    assert out["consistent"].tolist() == [[False, True, False, True]]
    assert torch.allclose(out["reward"], t([[2.0, 2.5, 2.0, 2.5]]))
    assert all(torch.isfinite(v.double()).all() for v in out.values())


# -----------------------------------------------------------------------------
# advantages


def test_zero_std_advantages_exactly_zero():
    # float32 means of [0.9]*3 and [0.45]*3 round off the value; must still give exact zeros
    r = t([[1.0, 1.0, 1.0], [0.9, 0.9, 0.9], [0.45, 0.45, 0.45], [2.5, 2.5, 2.5]], torch.float32)
    assert torch.equal(care.group_advantages(r), torch.zeros_like(r))
    # G == 1: unbiased std is undefined; treated as 0 -> adv 0, never NaN
    assert torch.equal(care.group_advantages(t([[2.5], [1.0]])), torch.zeros(2, 1, dtype=torch.float64))


def test_advantages_hand_computed_unbiased_std():
    r = t([[0.0, 1.0, 2.0, 2.5]])
    mean = 5.5 / 4  # 1.375
    # squared deviations 1.890625 + 0.140625 + 0.390625 + 1.265625 = 3.6875; / (4-1)
    std = math.sqrt(3.6875 / 3)  # 1.10868 (population std would be 0.96014)
    expected = [(x - mean) / (std + 1e-4) for x in [0.0, 1.0, 2.0, 2.5]]
    assert torch.allclose(care.group_advantages(r), t([expected]), atol=1e-10)


# -----------------------------------------------------------------------------
# loss


def test_k3_kl_hand_value():
    # d = ref - logp = log 2: e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853
    kl = care.k3_kl(t([0.0, -1.0]), t([math.log(2.0), -1.0]))
    assert torch.allclose(kl, t([2.0 - math.log(2.0) - 1.0, 0.0]))


LOGP = [[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
ADV = [2.0, -1.0]


def test_loss_ratio_one_value_and_gradient():
    logp = t(LOGP).requires_grad_(True)
    loss, stats = care.policy_loss(logp, t(ADV), t(MASK))
    # ratio == 1: seq 0 token-mean of adv = 2, seq 1 = -1 -> loss = -(2 - 1)/2 = -0.5
    # (a global token mean would give -(2*2 - 1*3)/5 = -0.2)
    assert abs(loss.item() - (-0.5)) < 1e-12
    assert stats == {"kl": 0.0, "clip_frac": 0.0}
    loss.backward()
    # d loss / d logp[n,t] = -(adv[n] / (N |o_n|)) * mask[n,t], N = 2, |o| = [2, 3]
    expected = [[-2.0 / 4, -2.0 / 4, 0.0], [1.0 / 6, 1.0 / 6, 1.0 / 6]]
    assert torch.allclose(logp.grad, t(expected), atol=1e-12)
    assert logp.grad[0, 2] == 0.0  # masked token gets no gradient


def test_loss_with_k3_kl_penalty():
    logp = t(LOGP).requires_grad_(True)
    ref = t([[-1.5, -2.0, -1.0], [-0.5, -1.0, -3.0]])
    # d = ref - logp = [[-0.5, 0, 2(masked)], [0, 0.5, -0.5]]
    k_m05 = math.exp(-0.5) + 0.5 - 1  # 0.1065307
    k_p05 = math.exp(0.5) - 0.5 - 1  # 0.1487213
    kl0, kl1 = (k_m05 + 0.0) / 2, (0.0 + k_p05 + k_m05) / 3
    beta = 0.1
    expected_loss = -((2.0 - beta * kl0) + (-1.0 - beta * kl1)) / 2  # -0.4930825
    loss, stats = care.policy_loss(logp, t(ADV), t(MASK), ref_logp=ref, beta=beta)
    assert abs(loss.item() - expected_loss) < 1e-10
    assert abs(stats["kl"] - (kl0 + kl1) / 2) < 1e-10  # 0.0691747
    loss.backward()
    # d k3 / d logp = 1 - e^d, so d loss / d logp = -(mask / (N|o|)) * (adv - beta (1 - e^d))
    d = t([[-0.5, 0.0, 2.0], [0.0, 0.5, -0.5]])
    lens = t([[2.0], [3.0]])
    expected = -(t(MASK) / (2 * lens)) * (t(ADV)[:, None] - beta * (1 - torch.exp(d)))
    assert torch.allclose(logp.grad, expected, atol=1e-12)


def test_ppo_clipped_loss():
    ratio = t([[1.5, 1.1, 2.0], [0.5, 1.5, 0.9]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = t([1.0, -1.0])
    old = t([[-1.0, -1.2, -0.7], [-2.0, -0.3, -1.1]])
    logp = (old + torch.log(ratio)).detach().requires_grad_(True)
    loss, stats = care.policy_loss(logp, adv, mask, old_logp=old, epsilon=0.2)
    # seq 0 (adv +1): min(1.5, 1.2) = 1.2 (clipped), 1.1, [masked]       -> mean 1.15
    # seq 1 (adv -1): min(-0.5, -0.8) = -0.8 (clipped), min(-1.5, -1.2) = -1.5, -0.9 -> -3.2/3
    expected_loss = -(1.15 + (-3.2 / 3)) / 2  # -0.0416667
    assert abs(loss.item() - expected_loss) < 1e-10
    assert abs(stats["clip_frac"] - 2 / 5) < 1e-12  # 2 clipped of 5 masked tokens
    loss.backward()
    # unclipped tokens: d/dlogp (ratio*adv) = ratio*adv; loss grad = -(ratio*adv)/(N|o_n|)
    expected = [[0.0, -1.1 / 4, 0.0], [0.0, 1.5 / 6, 0.9 / 6]]
    assert torch.allclose(logp.grad, t(expected), atol=1e-12)


# -----------------------------------------------------------------------------
# groups are independent


def test_batched_groups_match_single_groups():
    g = torch.Generator().manual_seed(0)
    P, G = 2, 6
    acc = torch.tensor([[1, 0, 1, 1, 0, 1], [0.05, 0.6, 0.3, 0.9, 0.3, 0.0]], dtype=torch.float64)
    fmt = (torch.rand(P, G, generator=g) > 0.3).double()
    l = torch.log(torch.rand(P, G, generator=g, dtype=torch.float64) * 0.9 + 0.1)
    has = torch.rand(P, G, generator=g) > 0.2
    both = care.care_rewards(acc, fmt, l, has, margin=0.02)
    adv = care.group_advantages(both["reward"])
    for i in range(P):
        one = care.care_rewards(acc[i:i + 1], fmt[i:i + 1], l[i:i + 1], has[i:i + 1], margin=0.02)
        for k in both:
            assert torch.equal(both[k][i:i + 1], one[k]), k
        assert torch.equal(adv[i:i + 1], care.group_advantages(one["reward"]))


def test_statistics_not_shared_across_groups():
    # group A all correct, group B all wrong (format ok): B's rewards are all 1 -> adv 0
    acc = t([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    p = t([[0.9, 0.8, 0.9, 0.8], [0.9, 0.8, 0.9, 0.8]])
    out = care.care_rewards(acc, torch.ones_like(acc), torch.log(p), torch.ones(2, 4, dtype=torch.bool))
    adv = care.group_advantages(out["reward"])
    assert torch.equal(adv[1], torch.zeros(4, dtype=torch.float64))
    assert (adv[0].abs() > 0.5).all()
    # per-group means: A's acc does not lift B's accuracy bar, A's p does not lift B's mu
    acc = t([[1.0, 1.0, 1.0, 1.0], [0.3, 0.3, 0.2, 0.2]])
    p = t([[0.9, 0.8, 0.9, 0.8], [0.3, 0.2, 0.3, 0.2]])
    bonus, consistent = care.consistency_bonus(acc, p, torch.ones(2, 4, dtype=torch.bool))
    # B: mean acc 0.25 -> H = {0, 1}; mu = 0.25 -> C & H = {0} (batch mean 0.625 -> H empty)
    assert consistent.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert torch.allclose(bonus[1], t([0.15, 0.0, 0.0, 0.0]))


def test_grpo_rewards_have_the_fields_of_care_rewards():
    """One path in the loop: GRPO gives the same fields, with no bonus, no confidence, nobody in H."""
    acc = torch.tensor([[1.0, 0.0, 1.0]])
    fmt = torch.tensor([[1.0, 1.0, 0.0]])
    care_out = care.care_rewards(acc, fmt, torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
    grpo_out = care.grpo_rewards(acc, fmt)
    assert set(grpo_out) == set(care_out)
    assert grpo_out["reward"].tolist() == [[2.0, 1.0, 1.0]]
    assert not grpo_out["bonus"].any() and not grpo_out["ref_conf"].any()
    assert not grpo_out["consistent"].any() and not grpo_out["high_acc"].any()
    for key in care_out:
        assert grpo_out[key].shape == care_out[key].shape and grpo_out[key].dtype == care_out[key].dtype, key
