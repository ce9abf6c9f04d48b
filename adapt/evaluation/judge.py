"""Optional GPT-score judge for DriveLM: any local transformers chat model, with the official prompt.

DriveLM's challenge (`challenge/gpt_eval.py`) asks ChatGPT to rate each answer 0..100 against the
ground truth. Nothing here calls a remote API: the judge is a local chat model the user names, off by
default, and every report that carries a GPT score names that model, so nobody mistakes a small local
judge for the challenge's ChatGPT.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapt.errors import AdaptError

# challenge/gpt_eval.py, GPTEvaluation.prepare_chatgpt_message / forward (the prompt glued as published).
SYSTEM_MESSAGE = "an evaluator who rates my answer based on the correct answer"
RATING_PROMPT = ("Rate my answer based on the correct answer out of 100, with higher scores indicating that the "
                 "answer is closer to the correct answer, and you should be accurate to single digits like 62, "
                 "78, 41,etc. Output the number only")
_RATING = re.compile(r"\d+(?:\.\d+)?")


def judge_messages(answer: str, reference: str) -> list[dict[str, str]]:
    """The official judge conversation for one answer."""
    prompt = RATING_PROMPT + "This is the correct answer: " + reference + "This is my answer: " + answer
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]


def parse_rating(reply: str) -> float | None:
    """The first number of a judge reply if it lies in 0..100 (the official script calls float() on the
    reply and would crash on anything else; here an unusable reply is None and counted)."""
    found = _RATING.search(reply)
    if not found:
        return None
    value = float(found.group(0))
    return value if 0.0 <= value <= 100.0 else None


@dataclass
class LocalJudge:
    """A local chat model rating answers greedily with the official prompt."""

    name: str
    model: Any
    tokenizer: Any
    max_new_tokens: int = 8
    unparsable: int = field(default=0, init=False)

    @classmethod
    def load(cls, name_or_path: str, **kwargs: Any) -> LocalJudge:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path)
        except OSError as err:
            raise AdaptError(f"judge model {name_or_path!r} could not be loaded ({err})",
                             hint="name a local chat model folder (a transformers causal LM with a chat template)"
                             ) from None
        if not getattr(tokenizer, "chat_template", None):
            raise AdaptError(f"judge model {name_or_path!r} has no chat template",
                             hint="the judge must be a chat model; its tokenizer needs a chat_template")
        return cls(name_or_path, model.eval(), tokenizer, **kwargs)

    @torch.no_grad()
    def rate(self, answers: Sequence[str], references: Sequence[str]) -> list[float | None]:
        """0..100 per answer, None (and counted in `unparsable`) where the reply holds no rating."""
        ratings: list[float | None] = []
        for answer, reference in zip(answers, references, strict=True):
            ids = self.tokenizer.apply_chat_template(judge_messages(answer, reference), add_generation_prompt=True,
                                                     return_tensors="pt", return_dict=True)
            prompt = ids["input_ids"].to(self.model.device)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=pad)
            rating = parse_rating(self.tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
            self.unparsable += rating is None
            ratings.append(rating)
        return ratings
