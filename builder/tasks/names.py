"""The task vocabulary (optimum's task names), kept in the core package so `validate` needs no optimum.

It mirrors the transformers tasks of optimum's `TasksManager`; `tests/unit/test_tasks.py` keeps the two equal
whenever optimum is installed.
"""

from builder.errors import BuildError

TASKS: tuple[str, ...] = (
    "audio-classification",
    "audio-frame-classification",
    "audio-xvector",
    "automatic-speech-recognition",
    "depth-estimation",
    "feature-extraction",
    "fill-mask",
    "image-classification",
    "image-segmentation",
    "image-text-to-text",
    "image-to-image",
    "image-to-text",
    "mask-generation",
    "masked-im",
    "multiple-choice",
    "object-detection",
    "question-answering",
    "reinforcement-learning",
    "semantic-segmentation",
    "text-classification",
    "text-generation",
    "text-to-audio",
    "text2text-generation",
    "token-classification",
    "visual-question-answering",
    "zero-shot-image-classification",
    "zero-shot-object-detection",
)

BARE_MODEL_TASK = "feature-extraction"
"""The task of a model without a head: what an architecture named `*Model` implies, and what the card takes a
manifest that records no task for."""

# Architecture-name suffixes -> task, for recipes that leave `source.task` out (checked in this order).
_ARCHITECTURE_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForMultipleChoice", "multiple-choice"),
    ("ForImageClassification", "image-classification"),
    ("Model", BARE_MODEL_TASK),
)


def infer_task(architectures: list[str] | None) -> str | None:
    """The task a config's `architectures` implies, or None when nothing matches."""
    for architecture in architectures or ():
        for suffix, task in _ARCHITECTURE_SUFFIXES:
            if architecture.endswith(suffix):
                return task
    return None


# Task -> the transformers Auto class that loads a model for it (the head the task needs): the one table the build,
# the gate's probes, the ONNX exporter and the card's usage snippet read.
AUTO_CLASSES: dict[str, str] = {
    "text-generation": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "multiple-choice": "AutoModelForMultipleChoice",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "image-classification": "AutoModelForImageClassification",
}


def auto_class(task: str):
    """The transformers Auto class for `task` (AutoModelForCausalLM for text-generation, ...)."""
    import transformers  # deferred: validate and plan run without torch

    if task not in AUTO_CLASSES:
        raise BuildError(
            f"task {task!r} has no transformers model class in builder; use one of {', '.join(AUTO_CLASSES)}"
        )
    return getattr(transformers, AUTO_CLASSES[task])
