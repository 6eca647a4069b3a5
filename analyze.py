"""Analyses of checkpoints. One so far, `attention`: where the tokens a checkpoint generates
look, at the visual tokens (video frames, observation image) or at the text.

    python analyze.py attention --models Qwen2-VL-7B-Instruct runs/sft/final runs/grpo/checkpoint-001500/policy \\
        --labels base sft grpo --data SEED-Bench-R1/annotations/validation_L1.jsonl --data-root SEED-Bench-R1 \\
        --limit 100 --output-dir runs/attention --heatmap-sample <sample id>

SEED-Bench-R1 (arXiv 2503.24376) explains why RL generalises where SFT does not by where the
generated tokens attend: after GRPO they put more of their attention on the visual tokens. This
measures that, per checkpoint and layer, for the reasoning and the answer tokens apart.

What is measured. For each sample, one completion (greedy, or read from --completions) is fed
back after its prompt in one teacher-forced forward. In every decoder layer, the attention row
of each generated token (the softmax over all positions up to it, computed at that token's own
position) is split by where its keys are: video tokens, image tokens, the prompt's text (chat
template, question, instruction) and the completion itself; the four shares sum to 1. Shares
are averaged over heads, then over the sample's reasoning (or answer) tokens, then over the
samples (each sample weighs the same). Reasoning tokens: those that start before the last
`<answer>` tag, or all of them (the end of turn aside) when there is none; answer tokens: those
carrying the answer's text (reference.answer_token_span); the tags around the answer and the
end of turn count in neither.

How, exactly and within memory. The analysis forward runs the language model's layers through
ShareRecorder, registered as an attention implementation with transformers. Each layer hands it
its queries and keys after the rotary embedding (3D for the visual tokens) and its mask, the
exact inputs of its own kernel. It computes the layer's output with sdpa, as scoring does, and,
on the side, softmax(q k^T / sqrt(d)) under the mask for the completion's query rows only
(QUERY_CHUNK rows at a time, in fp32), reduces them at once to per-class sums and drops them.
So at any moment one chunk of one layer's rows exists, heads x QUERY_CHUNK x length floats,
never a layer's full length x length matrix (eager attention) nor all layers' (what
output_attentions keeps). tests/test_analyze.py checks the shares against eager attention's
output_attentions.

Outputs in --output-dir: attention.json (per checkpoint: per group, key class and layer the
mean share, their means over layers, and the per-sample values), attention.png (share on the
visual tokens against layer, one line per checkpoint, reasoning and answer apart) and
attention_heatmap.png (one sample's attention on each video frame and spatial patch, and on the
image, averaged over layers, heads and its generated tokens, one row per checkpoint).
"""

import argparse
import bisect
import json
import math
import os
import sys
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import data
import encoding
import models
import prefix_sharing
import reference
import rollout
from evaluate import HelpFormatter
from rewards import answer_block

KEY_CLASSES = ("video", "image", "text", "completion")   # where a generated token's attention goes
GROUPS = ("reasoning", "answer")                          # which generated tokens
QUERY_CHUNK = 256        # query rows whose probabilities exist at once (heads x QUERY_CHUNK x length floats)
ATTENTION_NAME = "analyze_attention_shares"               # the name ShareRecorder is registered under


# ---------------------------------------------------------------------------------------------
# Which token is which


def token_groups(ids, tokenizer, eos_ids):
    """[T] long, one entry per completion token: 0 reasoning, 1 answer, -1 neither.

    Reasoning: the tokens that start before the answer's <answer> tag (rewards.answer_block;
    byte-level BPE can merge the tag's "<" with the end of "</think>", so that token counts as
    reasoning: every character of the reasoning is in a reasoning token); with no answer, every
    token. eos_ids: the stop ids (rollout.stop_ids). Answer:
    the tokens whose characters overlap the answer's text (reference.answer_token_span, the
    span CARE scores). A trailing end of turn is in neither."""
    ids = list(ids)
    n = len(ids) - (1 if ids and ids[-1] in eos_ids else 0)   # the text tokens
    text_ids = ids[:n]
    groups = torch.full((len(ids),), -1, dtype=torch.long)
    text, ends = reference.decoded_offsets(text_ids, tokenizer)
    block = answer_block(text)
    if block is None:
        groups[:n] = 0
        return groups
    tag = reference.byte_offset(text, block[0] - len("<answer>"))   # where the answer's <answer> starts
    groups[:bisect.bisect_left([0] + ends[:-1], tag)] = 0          # the tokens that start before it
    span = reference.answer_token_span(text_ids, tokenizer)
    if span is not None:
        groups[span[0]:span[1]] = 1
    return groups


def key_classes(mm_token_type_ids, completion_length):
    """[prompt + completion] long: each position's index into KEY_CLASSES. mm_token_type_ids [P]
    is the prompt's (encoding.collate_prompts: 1 image, 2 video); every other prompt token,
    <|vision_start|> and <|vision_end|> included, is text."""
    mm = mm_token_type_ids
    classes = torch.full((len(mm) + completion_length,), KEY_CLASSES.index("text"), dtype=torch.long, device=mm.device)
    classes[:len(mm)][mm == 2] = KEY_CLASSES.index("video")
    classes[:len(mm)][mm == 1] = KEY_CLASSES.index("image")
    classes[len(mm):] = KEY_CLASSES.index("completion")
    return classes


# ---------------------------------------------------------------------------------------------
# The attention probabilities of the generated tokens, one layer and chunk at a time


def attention_probs(query, key, mask, rows, scaling):
    """[heads, len(rows), length] fp32: softmax(q k^T * scaling) over the keys the boolean mask
    allows, for the query positions `rows` only. query [1, heads, length, d], key [1, kv_heads,
    length, d] and mask [1, 1, length, length] are what the layer hands its attention kernel (after
    the rotary embedding); with grouped-query attention, query head h reads key head
    h // (heads / kv_heads), as transformers' repeat_kv lays them out."""
    heads, kv_heads = query.shape[1], key.shape[1]
    q = query[0, :, rows].float()                                     # [H, n, d]
    k = key[0].float().repeat_interleave(heads // kv_heads, dim=0)    # [H, length, d]
    logits = (q @ k.transpose(1, 2)) * scaling                        # [H, n, length]
    return logits.masked_fill(~mask[0, 0, rows], float("-inf")).softmax(dim=-1)


class ShareRecorder:
    """The attention implementation of the analysis forward (see recording). Each layer's output
    is sdpa's, as in scoring; on the side, the completion rows' probabilities (attention_probs),
    QUERY_CHUNK rows at a time, are reduced at once and dropped:

        shares[layer, group, class]  sum over the group's rows of the share on that key class,
                                     mean over heads
        visual[layer, v]             sum over reasoning and answer rows of the attention on
                                     visual position v, mean over heads

    rows [n]: the completion's positions; groups [n]: token_groups; classes [length]: key_classes;
    visual_positions [V]: the video, then the image positions, in prompt order."""

    def __init__(self, num_layers, rows, groups, classes, visual_positions):
        self.rows, self.groups, self.visual_positions = rows, groups, visual_positions
        self.one_hot = torch.nn.functional.one_hot(classes, len(KEY_CLASSES)).float()   # [length, C]
        self.shares = torch.zeros(num_layers, len(GROUPS), len(KEY_CLASSES), dtype=torch.float64)
        self.visual = torch.zeros(num_layers, len(visual_positions), dtype=torch.float64)
        self.layers_seen = []

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if attention_mask is None or attention_mask.dtype != torch.bool:
            raise ValueError("the analysis forward passes a boolean mask (see sample_shares)")
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)
        layer = module.layer_idx
        for start in range(0, len(self.rows), QUERY_CHUNK):
            probs = attention_probs(query, key, attention_mask, self.rows[start:start + QUERY_CHUNK], scaling)
            self.reduce(layer, probs, self.groups[start:start + QUERY_CHUNK])
            del probs   # before the next chunk's exist: one chunk of one layer at a time
        self.layers_seen.append(layer)
        return output, None   # no weights: nothing downstream can keep them

    def reduce(self, layer, probs, groups):
        per_class = (probs @ self.one_hot).mean(dim=0)                    # [n, C], mean over heads
        for g in range(len(GROUPS)):
            self.shares[layer, g] += per_class[groups == g].sum(dim=0).double().cpu()
        on_visual = probs[:, :, self.visual_positions].mean(dim=0)        # [n, V]
        self.visual[layer] += on_visual[groups >= 0].sum(dim=0).double().cpu()


@contextmanager
def recording(model, recorder):
    """Run the language model's attention through recorder inside the block. The vision tower
    keeps its own implementation (its config is a separate one)."""
    config = model.model.language_model.config
    if any(t != "full_attention" for t in config.layer_types):
        raise ValueError(f"the attention analysis supports full attention only, the model has {set(config.layer_types)}")
    # One global name, pointing at this call's recorder; nothing uses it outside the block.
    AttentionInterface.register(ATTENTION_NAME, recorder)
    # internal: transformers reads the attention kernel from this private config field per call.
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = saved


@torch.no_grad()
def sample_shares(model, prompt, completion, tokenizer, stop):
    """One sample's attention shares from one teacher-forced forward of prompt + completion.

    prompt: a batch of one without padding (encoding.select_prompt); completion [T]: its token
    ids up to and including the end of turn (stop: the stop ids). Returns a dict: shares [layers, groups, classes]
    (mean over heads and the group's tokens; NaN for a group with no tokens), tokens (per group),
    video and image (the attention on each visual token, mean over layers, heads and the
    reasoning and answer tokens; None without that visual)."""
    device = prompt["input_ids"].device
    width, n = prompt["input_ids"].shape[1], len(completion)
    # The packed row of the scoring forward, for one completion: ids, and 3D-RoPE positions
    # that continue the prompt's, as generation gave them.
    ids, positions, _, _ = prefix_sharing.pack_group(model, prompt, completion[None],
                                                     torch.ones(1, n, device=device))
    mm = prompt["mm_token_type_ids"][0]
    groups = token_groups(completion.tolist(), tokenizer, stop).to(device)
    video, image = (mm == 2).nonzero()[:, 0], (mm == 1).nonzero()[:, 0]
    num_layers = model.model.language_model.config.num_hidden_layers
    recorder = ShareRecorder(num_layers, torch.arange(width, width + n, device=device), groups,
                             key_classes(mm, n), torch.cat([video, image]))
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=device).tril()
    inputs = {k: prompt[k] for k in encoding.VISUAL_KEYS if k in prompt}
    inputs.update(input_ids=ids[None], position_ids=positions[:, None],
                  attention_mask={"full_attention": causal[None, None]})
    with recording(model, recorder):
        model(**inputs, use_cache=False, logits_to_keep=1)
    if sorted(recorder.layers_seen) != list(range(num_layers)):
        raise RuntimeError(f"the attention analysis saw layers {recorder.layers_seen}, not each of {num_layers} once")
    counts = torch.stack([(groups == g).sum() for g in range(len(GROUPS))]).cpu()   # [G]
    shares = recorder.shares / counts[None, :, None]        # 0 / 0 = NaN for an empty group
    visual = recorder.visual.mean(dim=0) / max(1, int((groups >= 0).sum()))
    return {"shares": shares, "tokens": dict(zip(GROUPS, counts.tolist())),
            "video": visual[:len(video)] if len(video) else None, "image": visual[len(video):] if len(image) else None}


# ---------------------------------------------------------------------------------------------
# A checkpoint over the samples


def read_completions(path):
    """{sample_id: completion text} from a JSONL or JSON list of rows with "sample_id" and
    "completion" (evaluate.py's predictions.jsonl is one). An id with two different
    completions (two benchmarks that reuse ids in one predictions file) is an error: which
    one belongs to --data cannot be told."""
    out = {}
    for where, row in data._read_rows(path):   # internal to data.py: JSONL or a JSON list, with line numbers
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict) or "sample_id" not in row or "completion" not in row:
            raise data.DataError(f"{where}: a completions row needs \"sample_id\" and \"completion\"")
        sid = str(row["sample_id"])
        if out.setdefault(sid, row["completion"]) != row["completion"]:
            raise data.DataError(f"{where}: sample {sid} has two different completions in {path}; "
                                 f"give a file with the rows of --data only")
    return out


def analyse_checkpoint(path, samples, budget_flags, max_new_tokens, batch_size, completions=None, heatmap_sample=None,
                       template=encoding.OURS):
    """Per-sample shares for one checkpoint: [{sample_id, completion, tokens, shares [layers,
    groups, classes]}], and the heat map of heatmap_sample (None if it has no visual). Completions
    are generated greedily, batch_size prompts a call, unless given as {sample_id: text}."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = models.load_model(path).to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    budget = encoding.budget_from_checkpoint(path, **budget_flags)
    stop = rollout.stop_ids(tokenizer, model)
    gen_config = rollout.sampling_config(tokenizer, max_new_tokens, temperature=None, top_p=None, top_k=None,
                                         do_sample=False, stop=stop)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows, heatmap = [], None
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        _, encoded, _ = encoding.encode_batch(batch, tokenizer, budget, template=template)
        prompts = {k: (v.to(device) if torch.is_tensor(v) else v)
                   for k, v in encoding.collate_prompts(encoded, tokenizer).items()}
        if completions is None:
            roll = rollout.generate(model, prompts, tokenizer, 1, gen_config)
            outs = [ids[:int(m.sum())] for ids, m in zip(roll.completion_ids, roll.completion_mask)]
        else:
            outs = [torch.tensor(tokenizer(completions[s.sample_id], add_special_tokens=False)["input_ids"] + [end_of_turn],
                                 device=device) for s in batch]
        for i, (sample, completion) in enumerate(zip(batch, outs)):
            prompt = encoding.select_prompt(prompts, i)
            result = sample_shares(model, prompt, completion, tokenizer, stop)
            rows.append({"sample_id": sample.sample_id, "tokens": result["tokens"], "shares": result["shares"],
                         "completion": tokenizer.decode(completion, skip_special_tokens=True)})
            if sample.sample_id == heatmap_sample and (result["video"] is not None or result["image"] is not None):
                heatmap = {"sample_id": sample.sample_id, "completion": rows[-1]["completion"],
                           "video": grid_map(result["video"], prompt.get("video_grid_thw"), budget.merge_size),
                           "image": grid_map(result["image"], prompt.get("image_grid_thw"), budget.merge_size)}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, heatmap


def grid_map(values, grid_thw, merge_size):
    """A visual's per-token values [V] as [t, h, w] nested lists (one token per merged patch, in
    the model's order: temporal patch, then row, then column), or None."""
    if values is None:
        return None
    t, h, w = grid_thw[0].tolist()
    return values.view(t, h // merge_size, w // merge_size).tolist()


def summarize(rows):
    """Mean over samples of the per-sample shares (NaN where no sample has tokens of a group):
    {group: {class or "visual": [per layer]}}, their means over layers, and samples per group."""
    shares = torch.stack([r["shares"] for r in rows])                       # [N, layers, G, C]
    shares = torch.cat([shares, shares[..., :2].sum(-1, keepdim=True)], -1)  # + visual = video + image
    mean = shares.nanmean(dim=0)                                            # [layers, G, C + 1]
    names = KEY_CLASSES + ("visual",)
    layers = {g: {c: [finite(x) for x in mean[:, gi, ci].tolist()] for ci, c in enumerate(names)}
              for gi, g in enumerate(GROUPS)}
    over_layers = {g: {c: finite(mean[:, gi, ci].mean().item()) for ci, c in enumerate(names)}
                   for gi, g in enumerate(GROUPS)}
    samples = {g: int((~shares[:, 0, gi, 0].isnan()).sum()) for gi, g in enumerate(GROUPS)}
    return layers, over_layers, samples


def finite(x):
    return None if x is None or not math.isfinite(x) else round(x, 6)


# ---------------------------------------------------------------------------------------------
# Figures


def plot_layers(report, path):
    """Share on the visual tokens against layer, one line per checkpoint, reasoning and answer
    apart; and each checkpoint's mean over layers split by key class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    checkpoints = report["checkpoints"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, group in zip(axes, GROUPS):
        for ckpt in checkpoints:
            ys = [math.nan if y is None else y for y in ckpt["layers"][group]["visual"]]
            ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=ckpt["label"])
        ax.set(title=f"{group} tokens", xlabel="layer", ylabel="share of attention on video + image tokens")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    ax, width = axes[2], 0.38
    colours = {"video": "tab:red", "image": "tab:orange", "text": "tab:blue", "completion": "tab:gray"}
    for i, ckpt in enumerate(checkpoints):
        for j, group in enumerate(GROUPS):
            bottom = 0.0
            for c in KEY_CLASSES:
                value = ckpt["mean_over_layers"][group][c] or 0.0
                ax.bar(i + (j - 0.5) * width, value, width * 0.95, bottom=bottom, color=colours[c],
                       hatch="//" if group == "answer" else None, label=c if i == j == 0 else None)
                bottom += value
    ax.set_xticks(range(len(checkpoints)), [c["label"] for c in checkpoints])
    ax.set(title="mean over layers (left bar reasoning, hatched answer)", ylabel="share of attention", ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Where generated tokens attend: {os.path.basename(report['settings']['data'])}, "
                 f"{report['settings']['samples']} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmap(report, path):
    """One sample's attention per video frame (temporal patch) and spatial patch, and on the
    image: a row per checkpoint, one colour scale for all (shares of all attention)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoints = [c for c in report["checkpoints"] if c["heatmap"]]
    panels = [[("video", t) for t in range(len(c["heatmap"]["video"] or []))] +
              ([("image", 0)] if c["heatmap"]["image"] else []) for c in checkpoints]
    cols = max(len(p) for p in panels)
    vmax = max(max(v for frame in (c["heatmap"][kind][t] for kind, t in p) for row in frame for v in row)
               for c, p in zip(checkpoints, panels))
    fig, axes = plt.subplots(len(checkpoints), cols, figsize=(2.2 * cols + 1, 2.2 * len(checkpoints) + 0.6),
                             squeeze=False)
    for r, (ckpt, row_panels) in enumerate(zip(checkpoints, panels)):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row_panels):
                ax.axis("off")
                continue
            kind, t = row_panels[c]
            image = ax.imshow(ckpt["heatmap"][kind][t], vmin=0, vmax=vmax, cmap="magma")
            ax.set_title(f"video, temporal patch {t}" if kind == "video" else "image", fontsize=8)
            if c == 0:
                ax.set_ylabel(ckpt["label"])
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of the generated tokens' attention")
    fig.suptitle(f"sample {checkpoints[0]['heatmap']['sample_id']}: attention on each visual token\n"
                 f"(mean over layers, heads, reasoning and answer tokens)", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The command line



def parse_args(argv):
    p = argparse.ArgumentParser(prog="analyze.py", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attention", formatter_class=HelpFormatter,
                       help="share of the generated tokens' attention on video, image, text and completion tokens",
                       description="Per checkpoint and layer, the share of the generated tokens' attention on video, "
                                   "image, prompt-text and completion tokens, reasoning and answer tokens apart "
                                   "(analyze.py's docstring says how).")
    a.add_argument("--models", nargs="+", required=True, metavar="DIR",
                   help="checkpoints to compare: local Hugging Face directories (required)")
    a.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                   help="one name per checkpoint for the JSON and figures (default: the directories)")
    a.add_argument("--data", required=True, metavar="FILE",
                   help="an annotation file, SEED-Bench-R1 JSONL or Video-R1-style JSON (required)")
    a.add_argument("--data-root", required=True, metavar="DIR",
                   help="the directory the file's video and image paths are relative to (required)")
    a.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where attention.json, attention.png and attention_heatmap.png go (required)")
    a.add_argument("--limit", type=int, default=0, metavar="N", help="analyse only the first N samples; 0: all")
    a.add_argument("--heatmap-sample", default=None, metavar="ID",
                   help="the sample whose per-frame heat map is drawn (default: the first analysed sample with "
                        "a video, else with an image)")
    a.add_argument("--completions", nargs="+", default=None, metavar="FILE",
                   help="one file per checkpoint with the completions to analyse (rows with sample_id and "
                        "completion, e.g. evaluate.py's predictions.jsonl) instead of generating them greedily")
    a.add_argument("--max-new-tokens", type=int, default=1024, metavar="N", help="longest generated completion, in tokens")
    a.add_argument("--batch-size", type=int, default=4, metavar="N", help="prompts per generate call")
    encoding.add_budget_arguments(a)
    a.add_argument("--prompt-template", default="ours", metavar="NAME|FILE", help=encoding.TEMPLATE_HELP)
    a.add_argument("--allow-outside-data-root", action="store_true",
                   help="allow media paths that resolve outside --data-root")
    args = p.parse_args(argv)
    check_args(a, args)
    return args


def check_args(parser, args):
    """Stop on a bad setting with one line naming it, before any model is loaded."""
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if problem := encoding.budget_problem(args):
        parser.error(problem)
    try:
        args.template = encoding.prompt_template(args.prompt_template)
    except ValueError as e:
        parser.error(str(e))
    if args.limit < 0:
        parser.error(f"--limit must be 0 (all) or more, got {args.limit}")
    missing = [m for m in args.models if not os.path.isdir(m)]
    if missing:
        parser.error(f"--models: no such directory: {', '.join(missing)} (a checkpoint is a local directory)")
    if args.labels is not None and len(args.labels) != len(args.models):
        parser.error(f"--labels names {len(args.labels)} checkpoints, --models lists {len(args.models)}")
    if args.labels is not None and len(set(args.labels)) != len(args.labels):
        parser.error("--labels must be distinct")
    if args.completions is not None and len(args.completions) != len(args.models):
        parser.error(f"--completions lists {len(args.completions)} files, --models {len(args.models)} checkpoints")
    for path in [args.data] + (args.completions or []):
        if not os.path.isfile(path):
            parser.error(f"no such file: {path}")
    if not os.path.isdir(args.data_root):
        parser.error(f"--data-root {args.data_root}: no such directory")


def attention_main(args):
    samples, _ = data.load_samples(args.data, args.data_root, allow_outside_root=args.allow_outside_data_root)
    samples = samples[:args.limit] if args.limit else samples
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise data.DataError(f"{args.data}: sample ids repeat; the analysis names samples by id")
    if args.heatmap_sample is None:
        with_visual = [s.sample_id for s in samples if s.video] + [s.sample_id for s in samples if s.image]
        heatmap_sample = with_visual[0] if with_visual else None
    elif args.heatmap_sample in ids:
        heatmap_sample = args.heatmap_sample
    else:
        raise data.DataError(f"--heatmap-sample {args.heatmap_sample} is not among the {len(ids)} samples analysed")
    labels = args.labels or args.models
    budget_flags = {k: getattr(args, k) for k in encoding.BUDGET_FLAGS}
    report = {"settings": {"data": args.data, "data_root": args.data_root, "samples": len(samples),
                           "completions": args.completions or f"greedy, at most {args.max_new_tokens} new tokens",
                           "visual_budget": budget_flags, "prompt_template": args.template.record(),
                           "key_classes": KEY_CLASSES, "groups": GROUPS,
                           "averaging": "over heads, then over a sample's tokens of the group, then over samples"},
              "checkpoints": []}
    for k, (label, path) in enumerate(zip(labels, args.models)):
        completions = read_completions(args.completions[k]) if args.completions else None
        if completions is not None and (absent := [i for i in ids if i not in completions]):
            raise data.DataError(f"{args.completions[k]}: no completion for sample(s) {', '.join(absent[:5])}")
        print(f"[{label}] {path}: {len(samples)} samples", file=sys.stderr)
        rows, heatmap = analyse_checkpoint(path, samples, budget_flags, args.max_new_tokens, args.batch_size,
                                           completions, heatmap_sample, args.template)
        layers, over_layers, with_tokens = summarize(rows)
        per_sample = [{"sample_id": r["sample_id"], "completion": r["completion"], "tokens": r["tokens"],
                       "shares": {g: {c: [finite(x) for x in r["shares"][:, gi, ci].tolist()]
                                      for ci, c in enumerate(KEY_CLASSES)} for gi, g in enumerate(GROUPS)}}
                      for r in rows]
        report["checkpoints"].append({"label": label, "model": path, "samples_with_tokens": with_tokens,
                                      "mean_over_layers": over_layers, "layers": layers, "heatmap": heatmap,
                                      "samples": per_sample})
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "attention.json"), "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
    plot_layers(report, os.path.join(args.output_dir, "attention.png"))
    if any(c["heatmap"] for c in report["checkpoints"]):
        plot_heatmap(report, os.path.join(args.output_dir, "attention_heatmap.png"))
    print(format_table(report))
    return report


def format_table(report):
    """Share on the visual tokens, mean over layers, per checkpoint: reasoning and answer."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"

    lines = ["| checkpoint | reasoning: visual % (video, image) | answer: visual % (video, image) |",
             "| --- | ---: | ---: |"]
    for c in report["checkpoints"]:
        cells = [f"{pct(m['visual'])} ({pct(m['video'])}, {pct(m['image'])})"
                 for m in (c["mean_over_layers"][g] for g in GROUPS)]
        lines.append(f"| {c['label']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return attention_main(args)


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # a bad row, file or video: the message names it
        sys.exit(f"analyze.py: {e}")
