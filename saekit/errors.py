"""Errors meant for people: each says what was wrong and what to do about it.

The CLI prints a `SaekitError` without a traceback and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

import difflib


class SaekitError(Exception):
    """Base class: the message is shown to the user as is."""


class HookError(SaekitError):
    """An unknown hook name."""

    @classmethod
    def unknown(cls, hook: str, valid: list[str]) -> HookError:
        close = difflib.get_close_matches(hook, valid, n=5, cutoff=0.5)
        hint = close or valid[:8]
        return cls(
            f"unknown hook {hook!r}. Closest valid hook names: {', '.join(hint)}"
            f" ({len(valid)} hooks in all, e.g. 'blocks.15.hook_resid_pre')."
        )


class ShapeError(SaekitError):
    """Sizes that must agree do not (d_in of an SAE, a cache, a model)."""


class DataError(SaekitError):
    """A dataset that is empty, unreadable, or too small for the budget asked."""


class ModelError(SaekitError):
    """A model that cannot be found or loaded."""


class FileFormatError(SaekitError):
    """A corrupt, truncated or foreign file (cfg.json, safetensors, manifest, checkpoint)."""


class NonFiniteError(SaekitError):
    """NaN or inf in activations or in the loss."""


class OptionError(SaekitError):
    """A config option of the wrong type or out of range; `option` is its field name."""

    def __init__(self, option: str, value: object, problem: str):
        self.option, self.value, self.problem = option, value, problem
        super().__init__(f"{option} = {value!r}: {problem}")


class OutputError(SaekitError):
    """An output path that cannot be written, or that holds something a command would destroy."""
