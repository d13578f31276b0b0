"""The base of every user-facing error: a mistake in what the user gave (config, data, model, input, server),
not a bug. Its message names the key, file or value and what is allowed; the ``vaegan`` command prints it as one
``error:`` line and exits with code 2 (stylegan2-ada's ``UserError``).

Nothing is imported here, so the command can catch it without importing torch, MLflow or Ray.
"""
from __future__ import annotations


class UserError(Exception):
    """A user-facing mistake. Subclasses keep their other bases (a ConfigError is still a ValueError)."""
