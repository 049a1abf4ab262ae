"""Errors a user can act on, raised where the bad input enters.

The CLI prints ``str(error)`` on one line and exits non-zero; library users
catch :class:`McGgufError`.
"""


class McGgufError(Exception):
    """Base class of every error mc-gguf reports to a user."""


class InvalidValueError(McGgufError, ValueError):
    """A setting (a command-line flag or a function argument) is out of its range."""


class CheckpointError(McGgufError):
    """The model folder is missing, incomplete, corrupt or truncated."""


class UnsupportedArchitectureError(McGgufError):
    """The checkpoint's architecture has no row in the MoE architecture table."""


class OutputPathError(McGgufError):
    """The output cannot be written where the user asked."""


class RuntimeBuildError(McGgufError):
    """The patched llama.cpp runtime could not be fetched, patched or built."""


class RuntimeMissingError(McGgufError):
    """llama_cpp is not installed, or not at the patch level that is needed."""


class GGUFFileError(McGgufError):
    """A GGUF file is missing, corrupt or not what the command expects."""


class ContextOverflowError(InvalidValueError):
    """A prompt (or a chat's system message and latest message) takes more tokens than the context holds."""


class ChatTemplateError(GGUFFileError):
    """The model's chat template (tokenizer.chat_template) cannot be parsed or rendered by jinja."""
