"""Library log messages that tell our users nothing, dropped at their source logger by text.

Each filter names the one message it drops; everything else those libraries log still shows.
"""

from __future__ import annotations

import logging

# transformers >= 5.25 warns that each image processor falls back to its PIL backend when
# torchvision is missing. We never install torchvision (it breaks torch on our machines), and the
# PIL backend is the one we test with.
_TORCHVISION_FALLBACK = ("transformers.utils.import_utils", "requires torchvision (not installed)")
# diffusers' SD3 pipeline warns on every prompt encoded past max_sequence_length T5 tokens (and
# shows the wrong slice of the prompt); the trainer reports truncation itself, once per run.
T5_TRUNCATION = (
    "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
    "was truncated because `max_sequence_length`",
)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def drop(logger_name: str, text: str) -> None:
    """Drops ``logger_name``'s records whose message contains ``text`` (once per pair)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
        logger.addFilter(_DropMessage(text))


def quiet_torchvision_fallback() -> None:
    drop(*_TORCHVISION_FALLBACK)
