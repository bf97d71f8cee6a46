"""The prompt format: how an image, a prompt and a text become the model's input, stated by the user and
never guessed (docs/data-and-runs.md#the-prompt-format).

Three kinds of format:

- ``"chat-template"``: the model folder's own chat template, rendering a user turn (the image, then the
  prompt) and an assistant turn holding the text;
- ``"plain"``: the image, the prompt and the text concatenated with nothing between them, then the end
  token (the tokenizer's beginning-of-sequence token first, where it adds one);
- a template of your own, e.g. ``"{image}Describe the card: {text}"`` or
  ``"USER: {image}\\n{prompt} ASSISTANT: {text}"``: ``{image}`` once (the family's image placeholder),
  ``{prompt}`` at most once, ``{text}`` once and last; the end token follows.

The loss covers the text's own tokens and the one token that ends it (the end token, or the chat
template's end of turn) and nothing else: see :func:`label_span`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from gradaudit.errors import ConfigError, FormatMissing, ModelError

CHAT_TEMPLATE = "chat-template"
PLAIN = "plain"
_PLAIN_TEMPLATE = "{image}{prompt}{text}"


def chat_templated(processor):
    """What holds the chat template: the processor, else its tokenizer; None where neither has one."""
    for holder in (processor, getattr(processor, "tokenizer", None)):
        if getattr(holder, "chat_template", None):
            return holder
    return None


def _fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:  # an unmatched brace
        raise ConfigError(f"prompt format {template!r} is not a valid template: {exc}") from None


@dataclass(frozen=True)
class PromptFormat:
    """A stated prompt format: ``spec`` is "chat-template", "plain", or a template (see the module)."""

    spec: str

    def __post_init__(self):
        if not isinstance(self.spec, str) or not self.spec:
            raise ConfigError(f"prompt_format must be 'chat-template', 'plain' or a template with {{image}}, "
                              f"{{prompt}} and {{text}}; got {self.spec!r}")
        if self.spec in (CHAT_TEMPLATE, PLAIN):
            return
        fields = _fields(self.spec)
        unknown = sorted(set(fields) - {"image", "prompt", "text"})
        if unknown:
            raise ConfigError(f"prompt format {self.spec!r}: unknown field(s) {unknown}; a template may hold "
                              "{image}, {prompt} and {text} only (write {{ and }} for literal braces)")
        if fields.count("image") != 1 or fields.count("text") != 1 or fields.count("prompt") > 1:
            raise ConfigError(f"prompt format {self.spec!r} must hold {{image}} once, {{text}} once and "
                              "{prompt} at most once")
        if not self.spec.endswith("{text}"):
            raise ConfigError(f"prompt format {self.spec!r} must end with {{text}}: what follows the text is "
                              "the end token, which GradAudit adds")

    @property
    def template(self) -> str | None:
        """The template string, None for the chat template."""
        return None if self.spec == CHAT_TEMPLATE else _PLAIN_TEMPLATE if self.spec == PLAIN else self.spec

    def parts(self, processor, image: str, prompt: str, text: str, end: str) -> tuple[str, str]:
        """(head, tail) around ``text`` for one pair: what precedes the text and what ends it. ``processor``
        (or its tokenizer) holds the chat template, ``image`` the family's image placeholder,
        ``end`` the token that ends a template format's text."""
        if self.template is not None:
            head = self.template[: -len("{text}")].replace("{{", "\x00").replace("}}", "\x01")
            head = head.replace("{image}", image).replace("{prompt}", prompt)
            return head.replace("\x00", "{").replace("\x01", "}"), end
        templated = chat_templated(processor)
        if templated is None:
            raise ModelError("prompt_format 'chat-template' was stated, but the model folder has no chat template; "
                             "state 'plain' or a template instead")
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                 {"role": "assistant", "content": [{"type": "text", "text": text}]}]
        full = templated.apply_chat_template(turns, tokenize=False)
        at = full.rfind(text) if text else -1
        if at < 0:
            raise ModelError(f"the chat template does not render the text {text[:40]!r} verbatim, so its tokens "
                             "cannot be told apart; state a template instead")
        return full[:at], full[at + len(text):]


def label_span(tokenizer, head: str, text: str) -> tuple[int, int]:
    """[start, end) of the text's tokens in ``tokenizer(head + text)``: from the first token that is not
    the head's alone (a token that merges the head's last characters with the text's first counts as
    the text's) to the text's last token."""
    head_ids = tokenizer(head)["input_ids"]
    both = tokenizer(head + text)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(head_ids, both)) if a != b), min(len(head_ids), len(both)))
    return start, len(both)


def resolve(stated: str | None, processor, native: str | None = None) -> PromptFormat:
    """The format to use: the stated one; else the family's own (``native``, where its processor fixes
    the format); else refused, naming what this model folder could take."""
    if stated is not None:
        return PromptFormat(stated)
    if native is not None:
        return PromptFormat(native)
    options = (["'chat-template' (the folder has one)"] if chat_templated(processor) else []) + [
        "'plain'", "a template such as '{image}{prompt}{text}'"]
    raise FormatMissing("the prompt format is not stated: how the model was trained to see an image, a prompt and "
                      f"a text decides every score. This model folder can take {', '.join(options)}")
