"""The settings of a training run (train.py), as a dataclass and as a command line: one --flag
per field with its help line and default, the valid range of each, and --reproduce-official.

    cfg = parse_config(["--algo", "care", "--lr", "1e-6"])   # what `python train.py ...` does

Every default is the official GRPO-CARE setting unless its help line says otherwise;
docs/algorithm.md#11-defaults-and-their-source gives the source of each.
"""

import argparse
import dataclasses
from dataclasses import dataclass

import encoding
import metrics
import rewards
import rollout


def setting(default, help):
    """A settings field with its --help line (the default is appended by argparse)."""
    return dataclasses.field(default=default, metadata={"help": help})


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser_for(config_cls, doc=None, defaults=True):
    """One --flag per field of config_cls, with its help line. defaults=False leaves a flag that
    is not given out of the result, which tells what the user set explicitly."""
    parser = Parser(description=doc, formatter_class=HelpFormatter, usage="%(prog)s [--flag value ...]")
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if defaults else argparse.SUPPRESS
        kind = {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, f.type)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=default, help=f.metadata["help"])
    return parser


def given(config_cls, argv):
    """The settings given explicitly on the command line, by field name."""
    return vars(parser_for(config_cls, defaults=False).parse_args(argv))


def parse(config_cls, argv=None, doc=None, checks=None, adjust=None):
    """config_cls from the command line. adjust(cfg, argv) may change it (presets); checks(cfg)
    returns (condition, message) pairs, and the first false one is the error."""
    parser = parser_for(config_cls, doc)
    cfg = config_cls(**vars(parser.parse_args(argv)))
    if adjust:
        adjust(cfg, argv)
    for ok, message in checks(cfg) if checks else []:
        if not ok:
            parser.error(message)
    return cfg


# ---------------------------------------------------------------------------------------------
# train.py's settings

BUDGET = encoding.VisualBudget()

# --preset NAME: a published recipe, as the settings it changes (flags given explicitly win).
PRESETS = {
    # SEED-Bench-R1's GRPO (arXiv 2503.24376; its src/open_r1_egoplan/grpo.py and scripts/grpo.sh):
    # Qwen2-VL-7B-Instruct, a KL of 0.1 (clamped at 11) to a frozen reference, the reward its
    # first-letter match alone (no format reward), its prompt layout, every frame and image
    # resized to 252x252 (its qwen_vl_utils sets 256x256 on every visual), 16 frames as
    # qwen_vl_utils counts them, TRL's sampling defaults (top-p 1, top-k 50, 256 new tokens)
    # and the Hugging Face Trainer's (linear schedule, no weight decay, gradient clip 1).
    "seed-bench-r1": {"model": "Qwen/Qwen2-VL-7B-Instruct", "algo": "grpo", "beta": 0.1, "kl_clamp": 11.0,
                      "format_weight": 0.0, "reward_rules": "seed-bench-r1", "prompt_template": "seed-bench-r1",
                      "max_frames": 16, "frame_rounding": "floor", "resize_rule": "qwen-vl-utils", "resize_to": 256,
                      "video_min_pixels": 128 * 28 * 28, "video_max_pixels": 196 * 28 * 28,
                      "image_min_pixels": 4 * 28 * 28, "image_max_pixels": 16384 * 28 * 28,
                      "top_p": 1.0, "top_k": 50, "max_prompt_length": 8192, "max_completion_length": 256,
                      "lr": 1e-6, "lr_schedule": "linear", "weight_decay": 0.0, "max_grad_norm": 1.0, "epochs": 1},
}

# What --reproduce-official sets (unless the flag is given explicitly): the public GRPO-CARE code's
# effective behaviour. Its EMA write is discarded under ZeRO-3, so its reference stays frozen;
# it never passes the sampled fps (1.0 s per temporal patch); it inherits transformers' top-k 50;
# qwen_vl_utils clamps the frame count and then rounds it down to even, bounds every frame to
# [128, 134.4] x 28 x 28 pixels (max(min(max, total / frames x 2), 1.05 x min) with min = max =
# 128 x 28 x 28) and fits sizes with its own smart_resize; its prompt, reward and answer span are
# its own (encoding.official_layout, rewards' "official" rules, reference.public_answer_span).
OFFICIAL = {"ema_decay": 1.0, "second_per_grid": 1.0, "top_k": 50, "frame_rounding": "floor",
            "video_min_pixels": 128 * 28 * 28, "video_max_pixels": int(128 * 28 * 28 * 1.05),
            "resize_rule": "qwen-vl-utils", "prompt_template": "official", "reward_rules": "official",
            "answer_span": "official"}


def flags(values):
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())


def preset_help():
    return "; ".join(f"{name}: {flags(values)}" for name, values in PRESETS.items())


@dataclass
class Config:
    preset: str = setting("", "a published recipe, applied before the flags given explicitly (which win): "
                              + preset_help())
    model: str = setting("Qwen/Qwen2.5-VL-7B-Instruct", "initial policy: a local checkpoint directory or a hub id")
    data: str = setting("SEED-Bench-R1/annotations/training_6k.jsonl", "training annotations (JSONL or JSON list)")
    data_root: str = setting("SEED-Bench-R1", "directory the videos and images in --data are relative to")
    output_dir: str = setting("runs/care", "where log.jsonl and the checkpoints go (one run per directory)")
    algo: str = setting("care", "care (accuracy + format + consistency bonus, EMA reference) or grpo (KL to a frozen reference)")
    seed: int = setting(42, "fixes the data order, every group's sampling seed and the initial RNG state")
    # batch: P prompts per process, G completions per prompt
    prompts_per_device: int = setting(1, "P: prompts per process per step (global batch = processes x P)")
    num_generations: int = setting(8, "G: completions sampled per prompt (a group)")
    epochs: int = setting(1, "passes over the training data")
    max_steps: int = setting(-1, "stop after this many steps if > 0 (also sets the cosine schedule's length)")
    # rollout
    max_prompt_length: int = setting(16384, "a longer prompt (text + visual tokens) is a data error")
    max_completion_length: int = setting(768, "new tokens per completion; longer ones are cut and marked truncated")
    temperature: float = setting(1.0, "sampling temperature of the rollouts")
    top_p: float = setting(0.95, "nucleus sampling of the rollouts")
    top_k: int = setting(0, "top-k sampling of the rollouts, 0 = off (the public code inherits 50)")
    repetition_penalty: float = setting(1.0, "1.0 = off")
    decode: str = setting("static", "how rollouts decode: static (a preallocated KV cache), dynamic (transformers' "
                                    "growing cache) or compiled (the static cache, the language model's decode step "
                                    "through torch.compile; compiles once per prompt-length bucket); the same tokens")
    prompt_template: str = setting("ours", encoding.TEMPLATE_HELP)
    # reward and CARE
    reward_rules: str = setting("ours", "how accuracy and format are scored: ours, official (the public GRPO-CARE "
                                        "rules) or seed-bench-r1 (its first-letter match; multiple choice only)")
    format_weight: float = setting(1.0, "weight w of the format reward: r = accuracy + w x format (+ bonus); 0 = off")
    bonus_coef: float = setting(0.5, "CARE: consistency bonus = bonus_coef x accuracy")
    conf_cap: float = setting(0.95, "CARE: the reference confidence is capped at this value")
    consistency_margin: float = setting(0.0, "CARE: consistent if confidence >= mean over high-accuracy peers - margin "
                                             "(0.01 when targeting general video benchmarks)")
    ema_decay: float = setting(0.995, "CARE: reference <- decay x reference + (1 - decay) x policy; 1.0 = frozen")
    ema_every: int = setting(10, "CARE: steps between reference updates")
    answer_span: str = setting("tags", "CARE: the answer tokens the reference scores: tags (those carrying the text "
                                       "of the last <answer> block) or official (the public code's search)")
    reference_input: str = setting("full", "CARE: what the reference reads before a completion: full (the prompt with "
                                           "its video and image, the paper's) or text (the prompt's text alone: "
                                           "question, options, instruction; the answer's likelihood then rests on "
                                           "the reasoning, not on what the reference sees)")
    # loss; beta < 0 means "the algorithm's default": 0 for care, 0.04 for grpo
    num_iterations: int = setting(1, "policy updates per rollout (> 1 uses the PPO clipped ratio)")
    epsilon: float = setting(0.2, "PPO clip range (only with --num-iterations > 1)")
    beta: float = setting(-1.0, "KL coefficient to the reference; < 0 = the algorithm's default (care 0, grpo 0.04)")
    kl_clamp: float = setting(10.0, "the KL term's log-ratio ref - logp is clamped to [-c, c] (the public code's 10); "
                                    "0 = off")
    # optimizer
    lr: float = setting(1e-6, "peak learning rate (AdamW)")
    lr_schedule: str = setting("cosine", "decay of the learning rate to 0 after the warmup: cosine or linear")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on norms and biases)")
    adam_beta1: float = setting(0.9, "AdamW beta1")
    adam_beta2: float = setting(0.999, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    warmup_steps: int = setting(0, "linear warmup steps before the cosine decay")
    max_grad_norm: float = setting(5.0, "gradient-norm clip")
    freeze_vision: bool = setting(False, "do not train the vision tower (the official recipe trains it)")
    # LoRA (off by default: the official recipe trains every weight)
    lora_rank: int = setting(0, "LoRA: train rank-R adapters on a frozen base instead of every weight; 0 = off "
                                "(full fine-tuning)")
    lora_alpha: float = setting(0.0, "LoRA: the adapters' scale is alpha / rank; 0 = 2 x rank")
    lora_dropout: float = setting(0.0, "LoRA: dropout on the adapters' input while training")
    lora_target_modules: str = setting("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                       "LoRA: the language model's linear layers that get adapters (comma list)")
    lora_vision: bool = setting(False, "LoRA: also put adapters on the vision blocks' linear layers "
                                       "(otherwise the vision tower is frozen)")
    gradient_checkpointing: bool = setting(True, "recompute activations in backward to save memory")
    logprob_chunk_size: int = setting(1024, "completion tokens per LM-head chunk when scoring (bounds logits memory)")
    mixed_precision: str = setting("auto", "auto (bf16 on GPU, no on CPU) | bf16 | no")
    attn_implementation: str = setting("auto", "auto (flash_attention_2 if installed on GPU, else sdpa) | sdpa | eager")
    # visual budget (defaults: encoding.VisualBudget)
    fps: float = setting(BUDGET.fps, "video frames sampled per second")
    min_frames: int = setting(BUDGET.min_frames, "fewest video frames")
    max_frames: int = setting(BUDGET.max_frames, "most video frames")
    video_min_pixels: int = setting(BUDGET.video_min_pixels, "fewest pixels per video frame after resizing")
    video_max_pixels: int = setting(BUDGET.video_max_pixels, "most pixels per video frame after resizing")
    image_min_pixels: int = setting(BUDGET.image_min_pixels, "fewest pixels of the observation image after resizing")
    image_max_pixels: int = setting(BUDGET.image_max_pixels, "most pixels of the observation image after resizing")
    second_per_grid: float = setting(BUDGET.second_per_grid, "seconds per temporal patch in the video positions: 0 = measured from the "
                                          "sampled fps; 1.0 = the public code's fixed value")
    frame_rounding: str = setting(BUDGET.frame_rounding, "frame count: nearest (round to the temporal patch, then clamp) | "
                                             "floor (the public code: clamp, then round down to even)")
    resize_rule: str = setting(BUDGET.resize_rule, encoding.RESIZE_RULE_HELP)
    resize_to: int = setting(BUDGET.resize_to, encoding.RESIZE_TO_HELP)
    reproduce_official: bool = setting(False, "the public GRPO-CARE code's effective behaviour (flags given explicitly "
                                              "win): " + flags(OFFICIAL))
    # data checks
    skip_bad_samples: bool = setting(False, "skip (and count) unreadable samples instead of stopping")
    check_data: bool = setting(False, "decode every video and image before step 1")
    allow_outside_data_root: bool = setting(False, "allow media paths that lead outside --data-root")
    # bookkeeping
    save_every: int = setting(500, "steps between checkpoints (the last step is always saved)")
    keep_last: int = setting(0, "keep only the newest N checkpoints; 0 = keep all")
    resume: str = setting("", "a checkpoint directory, or auto for the newest complete one in --output-dir")
    overwrite: bool = setting(False, "delete the run already in --output-dir and start a new one")
    allow_config_change: bool = setting(False, "resume even if the run-defining settings differ from the checkpoint's")
    log_completions: bool = setting(False, "also write every completion and its rewards to completions.jsonl")
    report_to: str = setting("", "also send log.jsonl's numbers to tensorboard (OUTPUT/tensorboard) and/or wandb "
                                 "(OUTPUT/wandb), comma-separated; each needs its pip package")


def check_settings(cfg):
    """Every setting with a valid range, as (condition, message); the first false one is reported."""
    return [
        (cfg.preset in ("", *PRESETS), f"--preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}"),
        (cfg.algo in ("care", "grpo"), f"--algo must be care or grpo, got {cfg.algo!r}"),
        (cfg.format_weight >= 0, f"--format-weight must be >= 0, got {cfg.format_weight}"),
        (cfg.num_generations >= 2, f"--num-generations must be >= 2 (group statistics need two samples), "
                                   f"got {cfg.num_generations}"),
        (cfg.prompts_per_device >= 1, f"--prompts-per-device must be >= 1, got {cfg.prompts_per_device}"),
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (cfg.max_steps != 0, "--max-steps must be > 0, or < 0 for whole epochs"),
        (cfg.save_every >= 1, f"--save-every must be >= 1, got {cfg.save_every}"),
        (cfg.ema_every >= 1, f"--ema-every must be >= 1, got {cfg.ema_every}"),
        (cfg.keep_last >= 0, f"--keep-last must be >= 0, got {cfg.keep_last}"),
        (cfg.num_iterations >= 1, f"--num-iterations must be >= 1, got {cfg.num_iterations}"),
        (cfg.logprob_chunk_size >= 1, f"--logprob-chunk-size must be >= 1, got {cfg.logprob_chunk_size}"),
        (cfg.max_prompt_length >= 1, f"--max-prompt-length must be >= 1, got {cfg.max_prompt_length}"),
        (cfg.max_completion_length >= 1, f"--max-completion-length must be >= 1, got {cfg.max_completion_length}"),
        (0 < cfg.ema_decay <= 1, f"--ema-decay must be in (0, 1], got {cfg.ema_decay}"),
        (cfg.bonus_coef >= 0, f"--bonus-coef must be >= 0, got {cfg.bonus_coef}"),
        (cfg.consistency_margin >= 0, f"--consistency-margin must be >= 0, got {cfg.consistency_margin}"),
        (0 < cfg.conf_cap <= 1, f"--conf-cap must be in (0, 1], got {cfg.conf_cap}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}"),
        (cfg.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {cfg.max_grad_norm}"),
        (cfg.epsilon > 0, f"--epsilon must be > 0, got {cfg.epsilon}"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (0 < cfg.top_p <= 1, f"--top-p must be in (0, 1], got {cfg.top_p}"),
        (cfg.top_k >= 0, f"--top-k must be >= 0, got {cfg.top_k}"),
        (cfg.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {cfg.repetition_penalty}"),
        (cfg.decode in rollout.DECODES, f"--decode must be one of {', '.join(rollout.DECODES)}, got {cfg.decode!r}"),
        (cfg.fps > 0, f"--fps must be > 0, got {cfg.fps}"),
        (1 <= cfg.min_frames <= cfg.max_frames, f"need 1 <= --min-frames <= --max-frames, got "
                                                f"{cfg.min_frames} and {cfg.max_frames}"),
        (1 <= cfg.video_min_pixels <= cfg.video_max_pixels, f"need 1 <= --video-min-pixels <= --video-max-pixels, "
                                                            f"got {cfg.video_min_pixels} and {cfg.video_max_pixels}"),
        (1 <= cfg.image_min_pixels <= cfg.image_max_pixels, f"need 1 <= --image-min-pixels <= --image-max-pixels, "
                                                            f"got {cfg.image_min_pixels} and {cfg.image_max_pixels}"),
        (cfg.second_per_grid >= 0, f"--second-per-grid must be >= 0 (0 = measured), got {cfg.second_per_grid}"),
        (cfg.frame_rounding in ("nearest", "floor"), f"--frame-rounding must be nearest or floor, "
                                                      f"got {cfg.frame_rounding!r}"),
        (cfg.resize_rule in encoding.RESIZE_RULES, f"--resize-rule must be one of {', '.join(encoding.RESIZE_RULES)}, "
                                                   f"got {cfg.resize_rule!r}"),
        (cfg.resize_to >= 0, f"--resize-to must be 0 (off) or more, got {cfg.resize_to}"),
        (cfg.reward_rules in rewards.RULES, f"--reward-rules must be one of {', '.join(rewards.RULES)}, "
                                            f"got {cfg.reward_rules!r}"),
        (cfg.answer_span in ("tags", "official"), f"--answer-span must be tags or official, got {cfg.answer_span!r}"),
        (cfg.reference_input in ("full", "text"), f"--reference-input must be full or text, got {cfg.reference_input!r}"),
        (cfg.reference_input == "full" or cfg.algo == "care", "--reference-input text is CARE's (--algo care): GRPO's "
                                                               "reference only gives the KL term"),
        (cfg.kl_clamp >= 0, f"--kl-clamp must be >= 0 (0 = off), got {cfg.kl_clamp}"),
        (cfg.lr_schedule in ("cosine", "linear"), f"--lr-schedule must be cosine or linear, got {cfg.lr_schedule!r}"),
        template_problem(cfg.prompt_template),
        (cfg.mixed_precision in ("auto", "bf16", "no"), f"--mixed-precision must be auto, bf16 or no, "
                                                         f"got {cfg.mixed_precision!r}"),
        (cfg.attn_implementation in ("auto", "flash_attention_2", "sdpa", "eager"),
         f"--attn-implementation must be auto, flash_attention_2, sdpa or eager, got {cfg.attn_implementation!r}"),
        (cfg.lora_rank >= 0, f"--lora-rank must be >= 0 (0 = off), got {cfg.lora_rank}"),
        (cfg.lora_alpha >= 0, f"--lora-alpha must be >= 0 (0 = 2 x rank), got {cfg.lora_alpha}"),
        (0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other: pick one"),
        *metrics.check_reporters(cfg.report_to),
    ]


def template_problem(spec):
    """(ok, message) for --prompt-template: a layout name or a readable template file."""
    try:
        encoding.prompt_template(spec)
    except ValueError as e:
        return False, str(e)
    return True, ""


def presets_where_not_given(cfg, argv):
    """--preset's settings, then --reproduce-official's, each where the flag is not given."""
    explicit = given(Config, argv)
    for wanted, values in ((cfg.preset, PRESETS.get(cfg.preset, {})), (cfg.reproduce_official, OFFICIAL)):
        for name, value in values.items() if wanted else ():
            if name not in explicit:
                setattr(cfg, name, value)


def parse_config(argv=None, doc=None):
    """Config from the command line (doc: the --help text, train.py's docstring)."""
    cfg = parse(Config, argv, doc=doc, checks=check_settings, adjust=presets_where_not_given)
    if cfg.beta < 0:  # the algorithm's default
        cfg.beta = 0.0 if cfg.algo == "care" else 0.04
    if cfg.algo == "grpo":
        cfg.ema_decay = 1.0  # plain GRPO: a frozen reference, used only for the KL term
    return cfg


def build_parser(defaults=True, doc=None):
    return parser_for(Config, doc, defaults)
