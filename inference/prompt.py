"""Chat templates: a conversation → token ids with the image's positions, and the supervision rule.

This is the one definition used by both training and serving. The image becomes `image_tokens`
placeholder ids (`IMAGE_PLACEHOLDER_ID`), one per patch embedding the model scatters in, as
transformers' `LlavaProcessor` expands `<image>`: every length and budget then counts the positions the
model sees. Placeholders are inserted as ids, never parsed from text, and user text is tokenised with
special-token strings split into plain text: nothing a user types can create an image slot or an
end-of-text token. Only assistant answers and the `<|endoftext|>` that ends each of them are supervised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from inference.config import TemplateName

IMAGE_PLACEHOLDER_ID = -200  # not a token: marks each position that takes one image patch embedding
IGNORE_INDEX = -100  # label value that cross-entropy ignores (PyTorch's default ignore_index)
IMAGE_MARKER = "<image>"  # where the image goes in LLaVA-style data files; never parsed in user text

PHI2_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str | None = None  # None for the question being asked now


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    has_image: bool = True  # the image goes at the start of the first question

    def __post_init__(self) -> None:
        if not self.turns:
            raise ValueError("a conversation needs at least one turn")
        if any(turn.answer is None for turn in self.turns[:-1]):
            raise ValueError("only the last turn may be unanswered")

    @classmethod
    def from_llava(cls, record: dict[str, Any]) -> Conversation:
        """A LLaVA-style record (`conversations` of human/gpt messages, `<image>` marker) → Conversation."""
        messages = record.get("conversations")
        if not isinstance(messages, list) or not messages:
            raise ValueError("record has no 'conversations' list")
        if len(messages) % 2:
            raise ValueError(f"record has {len(messages)} messages; expected human/gpt pairs")
        has_image = bool(record.get("image"))
        turns = []
        for index in range(0, len(messages), 2):
            human, gpt = messages[index], messages[index + 1]
            if not (_is_message(human, "human") and _is_message(gpt, "gpt")):
                raise ValueError(f"messages {index} and {index + 1} are not a human → gpt pair")
            question = human["value"]
            if IMAGE_MARKER in question:
                if not has_image or index > 0 or question.count(IMAGE_MARKER) > 1:
                    raise ValueError(
                        f"{IMAGE_MARKER} may appear once, in the first question, of a record with an image"
                    )
                question = question.replace(IMAGE_MARKER, "").strip()
            if IMAGE_MARKER in gpt["value"]:
                raise ValueError(f"{IMAGE_MARKER} appears in an answer")
            turns.append(Turn(question, gpt["value"].strip()))
        return cls(tuple(turns), has_image)


def _is_message(message: Any, role: str) -> bool:
    return isinstance(message, dict) and message.get("from") == role and isinstance(message.get("value"), str)


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]  # token ids, with `image_tokens` × IMAGE_PLACEHOLDER_ID where the image goes
    labels: list[int]  # same length; IGNORE_INDEX wherever the model is not supervised


# A template turns a conversation into segments: text (supervised or not), the image, end-of-text, or
# given token ids.
_IMAGE = object()
_END = object()
# The original project put the embedding of token 23893 (" comment" in phi-2's GPT-2 vocabulary)
# between the image and the question, as a separator.
ORIGINAL_SEPARATOR_ID = 23893


@dataclass(frozen=True)
class _Ids:
    ids: tuple[int, ...]


def _phi2_chat(conversation: Conversation, add_generation_prompt: bool) -> list[tuple[Any, bool]]:
    """`{system}\\nUSER: <image>\\n{question} ASSISTANT: {answer}<|endoftext|>\\nUSER: ...`"""
    segments: list[tuple[Any, bool]] = [(PHI2_SYSTEM + "\n", False)]
    for index, turn in enumerate(conversation.turns):
        if index:
            segments.append(("\n", False))
        segments.append(("USER: ", False))
        if index == 0 and conversation.has_image:
            segments += [(_IMAGE, False), ("\n", False)]
        segments.append((turn.question + " ASSISTANT:", False))
        if turn.answer is not None:
            segments += [(" " + turn.answer, True), (_END, True)]
    _check_generation_prompt(conversation, add_generation_prompt)
    return segments


def _plain(conversation: Conversation, add_generation_prompt: bool) -> list[tuple[Any, bool]]:
    """`<image>{caption}<|endoftext|>`: stage-1 alignment; the question text is not used."""
    if len(conversation.turns) != 1 or not conversation.has_image:
        raise ValueError("the plain template takes exactly one turn with an image")
    _check_generation_prompt(conversation, add_generation_prompt)
    answer = conversation.turns[0].answer
    return [(_IMAGE, False)] + ([] if answer is None else [(answer, True), (_END, True)])


def _original(conversation: Conversation, add_generation_prompt: bool) -> list[tuple[Any, bool]]:
    """`<image><id 23893>{question}{answer}<|endoftext|>`: the original project's checkpoint, no template text."""
    if len(conversation.turns) != 1 or not conversation.has_image:
        raise ValueError("the original template takes exactly one turn with an image")
    _check_generation_prompt(conversation, add_generation_prompt)
    turn = conversation.turns[0]
    segments = [(_IMAGE, False), (_Ids((ORIGINAL_SEPARATOR_ID,)), False), (turn.question, False)]
    return segments + ([] if turn.answer is None else [(turn.answer, True), (_END, True)])


def _check_generation_prompt(conversation: Conversation, add_generation_prompt: bool) -> None:
    unanswered = conversation.turns[-1].answer is None
    if unanswered != add_generation_prompt:
        raise ValueError(
            "a generation prompt needs an unanswered last turn"
            if add_generation_prompt
            else "the last turn has no answer to train on"
        )


TEMPLATES = {TemplateName.PHI2_CHAT: _phi2_chat, TemplateName.PLAIN: _plain, TemplateName.ORIGINAL: _original}


def render(
    template: TemplateName,
    conversation: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    add_generation_prompt: bool = False,
    *,
    image_tokens: int,
) -> Rendered:
    """Conversation → ids and labels, the image as `image_tokens` positions.

    With `add_generation_prompt` the last turn is the one being asked.
    """
    if image_tokens <= 0:
        raise ValueError(f"image_tokens must be positive, got {image_tokens}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no end-of-text token")
    input_ids: list[int] = []
    labels: list[int] = []
    for content, supervised in TEMPLATES[TemplateName(template)](conversation, add_generation_prompt):
        if content is _IMAGE:
            ids = [IMAGE_PLACEHOLDER_ID] * image_tokens
        elif content is _END:
            ids = [eos_id]
        elif isinstance(content, _Ids):
            ids = list(content.ids)
        else:
            ids = encode_text(tokenizer, content)
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return Rendered(input_ids, labels)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Plain text → ids; special-token strings such as `<|endoftext|>` stay ordinary text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
