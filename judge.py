"""The consistency judge: does a sample's reasoning lead to the answer it states?

A judge (by default the evaluated model itself) reads the multiple-choice question, its options
and the sample's reasoning with the final answer removed, and names the option the reasoning
leads to; the sample is consistent when that is the option it answered. A judge reply that
cannot be parsed counts as undecided (and as not consistent), never dropped. The judge may be
a model, "none", or a rule FILE.py:FUNCTION (the toy benchmark's exact rule).
"""

import os
import re

import torch
from transformers import GenerationConfig

import data
import rewards
import rollout

JUDGE_PROMPT = """Below are a multiple-choice question and the reasoning someone wrote while answering it. \
Their final answer has been removed.

{question}
Reasoning:
{reasoning}

Which option does this reasoning lead to? Reply with the option letter only, as <answer>X</answer>, \
or <answer>none</answer> if it does not settle on one option."""

# Option letters run A to Z, as data.py admits them (Video-R1 rows may have more than ten options).
OPTION_RE = re.compile(r"^\s*([A-Z])[.)]\s", re.MULTILINE)
THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
LETTER_RE = re.compile(r"\(?([A-Za-z])\)?\.?")
ANSWER_BLOCK_RE = re.compile(r"<answer>.*?</answer>", re.DOTALL)


def option_letters(sample):
    """The option letters of a multiple-choice question ("A. ..." lines), in order."""
    return OPTION_RE.findall(data.with_options(sample.question, sample.options))


def reasoning_of(completion):
    """The reasoning with the final answer removed: the <think> part when there is one, else
    the completion with every <answer>...</answer> cut out."""
    think = THINK_RE.findall(completion)
    text = think[-1] if think else ANSWER_BLOCK_RE.sub("", completion)
    return text.strip()


def as_letter(text, letters):
    """"B", "b", "(B)", "B." -> "B" when B is one of the letters; "none" -> "none"; else None."""
    text = (text or "").strip()
    if text.lower() == "none":
        return "none"
    m = LETTER_RE.fullmatch(text)
    return m.group(1).upper() if m and m.group(1).upper() in letters else None


def parse_verdict(reply, letters):
    """The judge's verdict: an option letter, "none", or None (undecided: malformed, or a
    letter that is not an option). Read from the last <answer> tag, else the bare reply."""
    tagged = rewards.extract_answer(reply)
    return as_letter(tagged if tagged is not None else reply, letters)


def judge_text(tokenizer, question, reasoning):
    """The judge's prompt as text, in its own chat format (ChatML when it has no template)."""
    content = JUDGE_PROMPT.format(question=question, reasoning=reasoning or "(no reasoning given)")
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


@torch.no_grad()
def judge_replies(judge, tokenizer, texts, max_new_tokens):
    """Greedy replies of the judge model to a batch of text prompts, through rollout.generate
    (the decode path of training and evaluation)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The judge's own end of sequence, and every one its checkpoint lists (rollout.stop_ids).
    stop = ({tokenizer.eos_token_id} | set(rollout.stop_ids(tokenizer, judge))) - {None, tokenizer.unk_token_id}
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stop),
                              pad_token_id=tokenizer.pad_token_id, num_beams=1)
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(judge.device)
    prompts = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}   # text only
    return rollout.generate(judge, prompts, tokenizer, 1, config).texts


def judge_rows(judge, tokenizer, samples, rows, max_new_tokens):
    """Add a verdict to each answered multiple-choice row: judge_reply, verdict (letter, "none"
    or None when undecided) and consistent (True/False; None when the row is not judged)."""
    todo = []
    for s, row in zip(samples, rows):
        row.update(judge_reply=None, verdict=None, consistent=None)
        letters = option_letters(s) if s.problem_type == "multiple choice" else []
        row["stated"] = as_letter(row["answer"], letters) if letters else None
        if row["stated"] not in (None, "none"):  # answered with an option: judged
            todo.append((s, row, letters))
    if not todo or judge is None:
        return
    if callable(judge) and not isinstance(judge, torch.nn.Module):  # a rule: (question, reasoning) -> reply
        replies = [judge(data.with_options(s.question, s.options), reasoning_of(row["completion"]))
                   for s, row, _ in todo]
    else:
        texts = [judge_text(tokenizer, data.with_options(s.question, s.options), reasoning_of(row["completion"]))
                 for s, row, _ in todo]
        replies = judge_replies(judge, tokenizer, texts, max_new_tokens)
    for (s, row, letters), reply in zip(todo, replies):
        row["judge_reply"] = reply
        row["verdict"] = parse_verdict(reply, letters)
        row["consistent"] = row["verdict"] == row["stated"]


def is_rule(judge):
    """--judge FILE.py:FUNCTION names a rule, not a model."""
    return re.fullmatch(r".+\.py:\w+", judge) is not None


def load_judge(path, model, tokenizer, device, dtype):
    """"self": the evaluated model; "none": no judge; FILE.py:FUNCTION: a rule, called with
    (question, reasoning) and returning a reply (experiments/synthetic/benchmark.py:rule_verdict
    checks consistency exactly on the synthetic benchmark); else any local Hugging Face chat
    model."""
    if path == "self":
        return model, tokenizer
    if path == "none":
        return None, tokenizer
    if is_rule(path):
        import importlib.util
        file, function = path.rsplit(":", 1)
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(file))[0], file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, function), tokenizer
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    try:
        judge = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ValueError:  # a vision-language model (Qwen2.5-VL has no causal-LM class)
        judge = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return judge.to(device).eval(), AutoTokenizer.from_pretrained(path)
