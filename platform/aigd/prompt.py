"""The one prompt, imported by training, evaluation and serving alike (the image policy is
`aigd.image_view`).

The seed put the question before the image in training and after it at inference. That mismatch is
impossible here: there is one builder.
The answer is a single token, so the model input is the same in training and serving and the
decision is read at the last prompt position (left padding keeps it at index -1).
"""

from __future__ import annotations

from aigd.config import ImagePolicy

LABEL_WORDS = ("Real", "Fake")  # class 0, class 1


def messages(policy: ImagePolicy) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": policy.prompt}]}]


def prompt_text(processor, policy: ImagePolicy) -> str:
    return processor.apply_chat_template(messages(policy), add_generation_prompt=True, tokenize=False)


def label_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "Real" and "Fake"; each must be one token or scoring is meaningless."""
    ids = []
    for word in LABEL_WORDS:
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"{word!r} is not a single token in this tokenizer: {enc}")
        ids.append(enc[0])
    return ids[0], ids[1]
