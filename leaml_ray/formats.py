"""Formats every layer shares (no dependencies): the prompts, option letters and QA text layouts."""

CAPTION_PROMPT = "Describe this image."
QA_GEN_PROMPT = "Ask a question about this image and answer it."
LETTERS = "ABCDEFGHIJ"


def question_text(question: str, choices: list[str] | None = None) -> str:
    """The user turn of a QA: the question, with lettered options for multiple choice."""
    if not choices:
        return question
    options = "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(choices))
    return f"{question}\n{options}\nAnswer with the option's letter."


def qa_target(question: str, answer: str) -> str:
    """What the QA generator learns to write."""
    return f"Question: {question}\nAnswer: {answer}"
