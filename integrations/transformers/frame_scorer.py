"""QuoTA's "self" frame scorer (arXiv 2503.08689): the wrapped VLM rates each frame's relevance to the question.

One batched LLM forward over a video's frames, each row ``[frame tokens] + tokens(question)`` with the frame's visual
tokens as the LLM receives them and 1-D positions; the score is ``P(yes) / (P(yes) + P(no))`` at the last position.
``decouple=True`` first asks (text only) which objects the question is about. The scorer needs the tokenizer:
``vtc.apply(model, "quota", scorer="self", processor=processor)``. Details: docs/methods/quota.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

RELEVANCE_PROMPT = "{question}\nDoes this frame show what is needed to answer the question? Answer yes or no."
OBJECTS_PROMPT = "Does this frame show any of: {objects}? Answer yes or no."
DECOUPLE_PROMPT = "Which objects does this question ask about? List them separated by commas.\n{question}\n"
_ROLE_PREFIX = re.compile(r"^\s*(user|USER|User)\s*:?\s*")
_ROLE_SUFFIX = re.compile(r"\s*(assistant|ASSISTANT|Assistant)\s*:?\s*$")


def _single_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    ids = set()
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id:
            ids.add(int(encoded[0]))
    return sorted(ids)


@dataclass
class SelfFrameScorer:
    """Scores frames with the wrapped model; counts its LLM calls (``calls``) so tests can check the batching."""

    tokenizer: object
    decouple: bool = False
    max_object_tokens: int = 24
    calls: int = 0
    generate_calls: int = 0
    _yes: list[int] = field(default_factory=list)
    _no: list[int] = field(default_factory=list)

    def __post_init__(self):
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a processor holds its tokenizer
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(
                "the 'self' frame scorer needs the model's processor or tokenizer: "
                "vtc.apply(model, 'quota', scorer='self', processor=processor)"
            )
        self.tokenizer = tokenizer
        self._yes = _single_token_ids(tokenizer, ("yes", " yes", "Yes", " Yes", "YES"))
        self._no = _single_token_ids(tokenizer, ("no", " no", "No", " No", "NO"))
        if not self._yes or not self._no:
            raise ValueError(
                "the 'self' frame scorer reads P(yes) vs P(no), but this tokenizer has no single token for "
                "'yes' or 'no'; use scorer='similarity' instead"
            )

    def question(self, text_ids: torch.Tensor) -> str:
        text = self.tokenizer.decode(text_ids.tolist(), skip_special_tokens=True)
        return _ROLE_SUFFIX.sub("", _ROLE_PREFIX.sub("", text.strip())).strip()

    def _encode(self, text: str, device) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long, device=device)

    @torch.no_grad()
    def objects(self, model, question: str) -> str:
        """QuoTA's query decoupling, one greedy text-only generation: the things the question is about."""
        ids = self._encode(DECOUPLE_PROMPT.format(question=question), model.device)[None]
        self.generate_calls += 1
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_object_tokens,
                             do_sample=False)
        answer = self.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        return ", ".join(part.strip() for part in answer.split(",") if part.strip())

    def prompt(self, model, question: str) -> str:
        if self.decouple:
            objects = self.objects(model, question)
            if objects:
                return OBJECTS_PROMPT.format(objects=objects)
        return RELEVANCE_PROMPT.format(question=question)

    @torch.no_grad()
    def score(self, model, frames: list[torch.Tensor], prompt: str) -> torch.Tensor:
        """``[T]`` relevance in [0, 1] of each frame (``[n_t, D]`` visual tokens) to ``prompt``; one LLM call per
        distinct frame size (one for every video the families produce)."""
        device = frames[0].device
        text = model.get_input_embeddings()(self._encode(prompt, device))
        scores = torch.empty(len(frames), dtype=torch.float32)
        by_size: dict[int, list[int]] = {}
        for t, frame in enumerate(frames):
            by_size.setdefault(int(frame.shape[0]), []).append(t)
        for indices in by_size.values():
            rows = torch.stack([torch.cat([frames[t].to(text.dtype), text]) for t in indices])
            self.calls += 1
            hidden = model.model.language_model(inputs_embeds=rows).last_hidden_state[:, -1]
            logits = model.lm_head(hidden).float()
            yes = torch.logsumexp(logits[:, self._yes], dim=-1)
            no = torch.logsumexp(logits[:, self._no], dim=-1)
            scores[indices] = torch.sigmoid(yes - no).cpu()
        return scores
