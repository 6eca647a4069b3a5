"""The real Qwen2 / Qwen2.5 tokenizer (tests/qwen_tokenizer.py, from the vendored BPE ranks): the
pieces whose correctness depends on real tokens. The answer span, including answers whose
last character is split across byte tokens; where a completion stops; the prompt's ids and
its visual placeholders against the Hugging Face processor's recipe."""

import numpy as np
import pytest
import torch
from PIL import Image

import data
import encoding
import qwen_tokenizer
import reference
import rollout


@pytest.fixture(scope="module")
def qwen():
    return qwen_tokenizer.build()


def test_the_real_vocabulary(qwen):
    assert qwen("描述这张图片的内容。", add_special_tokens=False)["input_ids"] == [53481, 108893, 45930, 104597, 1773]
    ids = {t: qwen.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                       "<|image_pad|>", "<|video_pad|>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                   "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    # Qwen2 merges the tags with their neighbours: why the span works from byte offsets
    toks = qwen.convert_ids_to_tokens(qwen("</think><answer>B</answer>", add_special_tokens=False)["input_ids"])
    assert toks == ["</", "think", "><", "answer", ">B", "</", "answer", ">"]


@pytest.mark.parametrize("answer,tokens", [
    ("B", [">B"]),
    ("B.", [">B", ".</"]),                       # the "." shares a token with the closing tag
    ("鸭", ["é¸Ń"]),
    ("龘", ["é¾", "ĺ"]),                          # one character, two byte tokens
    ("cup 🦆", ["cup", "ĠðŁ", "¦", "Ĩ"]),         # the last character split across three
    (" 12 ", ["1", "2"]),                        # surrounding spaces are not the answer
])
def test_the_answer_span_with_real_tokens(qwen, answer, tokens):
    ids = qwen(f"<think>so it is</think><answer>{answer}</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    lo, hi = reference.answer_token_span(ids, qwen)
    assert qwen.convert_ids_to_tokens(ids[lo:hi]) == tokens
    assert answer.strip() in qwen.decode(ids[lo:hi])


def test_a_truncated_character_does_not_shift_the_span(qwen):
    """An invalid byte sequence before the answer (a character cut by sampling) keeps its bytes:
    the span is still exactly the answer's tokens."""
    duck = qwen("🦆", add_special_tokens=False)["input_ids"]
    ids = (qwen("<think>a", add_special_tokens=False)["input_ids"] + duck[:1]
           + qwen("</think><answer>鸭子</answer>", add_special_tokens=False)["input_ids"])
    lo, hi = reference.answer_token_span(ids, qwen)
    assert qwen.decode(ids[lo:hi]) == "鸭子"


def test_stop_at_either_end_of_sequence(qwen):
    """Both ids the checkpoints' generation_config lists end a completion, and the mask follows."""
    class Checkpoint:
        generation_config = type("G", (), {"eos_token_id": [151645, 151643]})()
    stop = rollout.stop_ids(qwen, Checkpoint())
    assert stop == [151643, 151645]
    assert rollout.sampling_config(qwen, 8, stop=stop).eos_token_id == stop
    text = qwen("<think>x</think><answer>B</answer>", add_special_tokens=False)["input_ids"]
    rows = torch.tensor([text + [151643, 9, 9], text + [151645, 9, 9], text + [9, 9, 9]])
    mask, truncated = rollout.completion_mask_from_ids(rows, stop)
    assert mask.sum(1).tolist() == [len(text) + 1, len(text) + 1, len(text) + 3]
    assert truncated.tolist() == [False, False, True]
    assert rollout.stop_ids(qwen) == [151645]   # a model without a generation_config: <|im_end|> alone


def hf_grid(image, budget):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    proc = Qwen2VLImageProcessorPil(min_pixels=budget.image_min_pixels, max_pixels=budget.image_max_pixels,
                                    patch_size=budget.patch_size, merge_size=budget.merge_size,
                                    temporal_patch_size=budget.temporal_patch_size)
    return proc(images=[image], return_tensors="pt")["image_grid_thw"][0]


@pytest.mark.parametrize("layout", list(encoding.LAYOUTS))
def test_prompt_ids_and_placeholders_as_the_processor_makes_them(qwen, tmp_path, layout):
    """The Hugging Face processor expands <|image_pad|> to grid_thw.prod() / merge^2 copies and
    then tokenises the text: our ids must be exactly those, with the real vocabulary."""
    path = tmp_path / "obs.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path)
    sample = data.Sample("s", "multiple choice", "What should I do next to make tea?", "B",
                         options=["A. pour the water", "B. boil the kettle", "C. open the fridge", "D. wash a cup"],
                         image=str(path))
    budget = encoding.VisualBudget()
    template = encoding.PromptTemplate(layout)
    enc = encoding.encode_prompt(sample, qwen, budget, template)
    grid = hf_grid(Image.open(path), budget)
    n = int(grid.prod()) // budget.merge_size ** 2
    assert enc["image_grid_thw"][0].tolist() == grid.tolist() == [1, 26, 36] and n == 234   # 364 x 504 pixels
    text = encoding.chat_prompt(sample, template).replace("<|image_pad|>", "<|image_pad|>" * n)
    assert enc["input_ids"].tolist() == qwen(text, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"].tolist().count(151655) == n
    assert qwen.decode(enc["input_ids"]).count("<|vision_start|>") == 1
