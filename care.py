"""GRPO-CARE rewards, advantages and the policy loss.

Every tensor of per-completion values is [P, G]: P prompts, G sampled completions per
prompt. Every statistic is taken within one prompt's group (dim=1), never across the
batch, so the result for a prompt does not depend on which other prompts share its batch.

For one group with accuracy a_i in [0,1], format f_i in {0,1} and l_i = mean log-prob of
the answer tokens under the slowly-moving reference model:

    p_i   = min(exp(l_i), cap)                 reference confidence (0 if no answer span)
    H     = { i : a_i > 0.1, a_i >= mean_j a_j, i has an answer span }
    mu    = mean_{i in H} p_i
    C     = { i : p_i >= mu - margin }
    b_i   = coef * a_i * [i in H and i in C]   consistency bonus
    r_i   = a_i + f_i + b_i
    A_i   = (r_i - mean_j r_j) / (std_j r_j + eps)     std unbiased (N-1)

The bonus rewards a high-accuracy completion whose answer the reference model finds at
least as likely as its high-accuracy peers do, i.e. the answer follows from the reasoning
rather than being a lucky guess. Because it scales with a_i, an all-correct group (all
rewards equal under plain GRPO, so zero advantage) still gets a learning signal.

The loss is the GRPO token-level surrogate, averaged over tokens within a sequence first
and then over sequences:

    L = -(1/N) sum_n (1/|o_n|) sum_t m_nt * [ min(rho_nt A_n, clip(rho_nt, 1-e, 1+e) A_n)
                                              - beta * KL3_nt ]
    rho = exp(logp - old_logp),    KL3 = exp(d) - d - 1,  d = clamp(ref - logp, -c, c)   (c = 10)

Each formula, its edge cases and its defaults: docs/algorithm.md, sections 4 to 7 and 10
(e.g. docs/algorithm.md#5-the-consistency-bonus).
"""

import math

import torch


def _mean_within_range(x, dim=1):
    # A group mean can round to just above its largest member (e.g. three equal 0.3s), which
    # would make "x >= mean" false for everyone. Clamping into [min, max] is a no-op in exact
    # arithmetic and makes groups of equal values behave as the maths says they should.
    mean = x.mean(dim, keepdim=True)
    return torch.minimum(torch.maximum(mean, x.amin(dim, keepdim=True)), x.amax(dim, keepdim=True))


# -----------------------------------------------------------------------------
# rewards


def reference_confidence(answer_logp, has_span, conf_cap=0.95):
    """p = min(exp(answer_logp), conf_cap), and 0 where the completion has no answer span."""
    # The cap stops a few near-certain answers from dragging the group mean up so far that
    # everyone else looks "inconsistent"; samples above the cap are all equally confident.
    p = torch.exp(answer_logp).clamp(max=conf_cap)
    # torch.where (not multiplication) so NaN/inf log-probs of span-less rows never leak.
    return torch.where(has_span, p, torch.zeros_like(p))


def high_accuracy_mask(acc, has_span):
    """H: samples clearly right (acc > 0.1), at least as good as their group, with a span."""
    return (acc > 0.1) & (acc >= _mean_within_range(acc)) & has_span


def consistency_bonus(acc, p, has_span, margin=0.0, bonus_coef=0.5, with_high=False):
    """Bonus for high-accuracy samples whose reference confidence p is >= the H-mean - margin.

    Returns (bonus [P,G], consistent [P,G] bool); consistent = H & C, the rewarded samples.
    with_high: also return H [P,G] bool.
    """
    high = high_accuracy_mask(acc, has_span)
    n_high = high.sum(1, keepdim=True)
    # mean of p over H only; clamp(min=1) avoids 0/0 in groups with an empty H, whose
    # members are all excluded below anyway (consistent requires membership of H).
    mu = torch.where(high, p, torch.zeros_like(p)).sum(1, keepdim=True) / n_high.clamp(min=1)
    # same float-rounding guard as _mean_within_range: the most confident member of H always passes
    top = torch.where(high, p, torch.full_like(p, -math.inf)).amax(1, keepdim=True)
    mu = torch.minimum(mu, top)
    consistent = high & (p >= mu - margin)
    bonus = bonus_coef * acc * consistent.to(acc.dtype)
    return (bonus, consistent, high) if with_high else (bonus, consistent)


def care_rewards(acc, fmt, answer_logp, has_span, margin=0.0, bonus_coef=0.5, conf_cap=0.95):
    """Everything the training loop needs from the CARE reward in one call ([P,G] tensors):
    reward r, bonus b, consistent (H & C), ref_conf p, high_acc H."""
    ref_conf = reference_confidence(answer_logp, has_span, conf_cap)                   # [P, G]
    bonus, consistent, high = consistency_bonus(acc, ref_conf, has_span, margin, bonus_coef, with_high=True)
    return {"reward": acc + fmt + bonus, "bonus": bonus, "consistent": consistent, "ref_conf": ref_conf,
            "high_acc": high}


def grpo_rewards(acc, fmt):
    """Plain GRPO baseline: accuracy + format, no consistency term. The same fields as
    care_rewards (bonus, ref_conf zero; nobody consistent or in H), so the loop has one path."""
    zero = torch.zeros_like(acc)
    none = torch.zeros_like(acc, dtype=torch.bool)
    return {"reward": acc + fmt, "bonus": zero, "consistent": none, "ref_conf": zero, "high_acc": none}


# -----------------------------------------------------------------------------
# advantages


def group_advantages(rewards, eps=1e-4):
    """(r - mean) / (std + eps) within each group; unbiased std as in the official code.

    Identical rewards give exactly 0 (the mean is clamped into [min, max], so r - mean is
    exactly 0). With G == 1 the unbiased std is undefined (NaN); we use 0, so adv = 0: a single
    sample carries no relative information.
    """
    if rewards.shape[1] > 1:
        std = rewards.std(1, keepdim=True)
    else:
        std = torch.zeros_like(rewards)
    return (rewards - _mean_within_range(rewards)) / (std + eps)


# -----------------------------------------------------------------------------
# loss


def k3_kl(logp, ref_logp, clamp=0.0):
    """Per-token k3 estimator of KL(policy || ref): exp(d) - d - 1 with d = ref - logp.
    Always >= 0, and unbiased when tokens are sampled from the policy. clamp > 0 first limits d
    to [-clamp, clamp], as the public code does (10; SEED-Bench-R1's 11): a token the policy
    finds e^20 times less likely than the reference then adds e^10 - 11, not e^20 - 21, and
    beyond the clamp it adds no gradient."""
    d = ref_logp - logp
    if clamp > 0:
        d = d.clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


def policy_loss(logp, adv, mask, old_logp=None, epsilon=0.2, ref_logp=None, beta=0.0, kl_clamp=0.0):
    """GRPO surrogate loss over N = P*G flattened sequences.

    logp, mask (and old_logp, ref_logp) are [N, T]; adv is [N] (row n = prompt n // G,
    sample n % G). Returns (scalar loss, {"kl": float, "clip_frac": float}).
    """
    mask = mask.to(logp.dtype)
    adv = adv.to(logp.dtype).unsqueeze(1)  # one advantage per sequence, broadcast over tokens
    seq_len = mask.sum(1).clamp(min=1)

    def seq_token_mean(x):  # (1/|o_n|) sum_t m_nt x_nt, one value per sequence
        return (x * mask).sum(1) / seq_len

    if old_logp is None:
        # One update per rollout: old == current in value, so ratio == 1, but it still
        # carries d logp, giving the plain policy gradient adv * grad(logp).
        ratio = torch.exp(logp - logp.detach())
        objective = ratio * adv
        clip_frac = 0.0
    else:
        ratio = torch.exp(logp - old_logp.detach())
        clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon)
        objective = torch.minimum(ratio * adv, clipped_ratio * adv)
        # clipping is active (zero gradient) where the ratio has left the trust region in
        # the direction the advantage pushes it
        is_clipped = ((ratio > 1 + epsilon) & (adv > 0)) | ((ratio < 1 - epsilon) & (adv < 0))
        clip_frac = ((is_clipped.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)).item()

    kl = 0.0
    if ref_logp is not None:
        per_token_kl = k3_kl(logp, ref_logp.detach(), kl_clamp)
        kl = seq_token_mean(per_token_kl).mean().item()
        if beta > 0:
            objective = objective - beta * per_token_kl

    loss = -seq_token_mean(objective).mean()
    return loss, {"kl": kl, "clip_frac": clip_frac}
