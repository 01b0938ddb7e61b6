"""Model references: one grammar, one parser and one error message for every place that takes one.

`ModelRef.parse` reads 'name' (the latest version), 'name:3', 'name@alias' or a 64-character
manifest digest into a value; the registry (`distml.models.artifact.resolve_model`) resolves it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from distml.core.errors import DistmlError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")
GRAMMAR = "expected 'name', 'name:version', 'name@alias' or a 64-character manifest digest, e.g. cnn:3"


NAME_RULE = "1-200 letters, digits, '_', '.' or '-', starting with a letter or digit and not a 64-character hex digest"


def _valid_name(value: Any) -> bool:
    return isinstance(value, str) and bool(NAME_PATTERN.match(value)) and not DIGEST_PATTERN.match(value)


def check_name(kind: str, value: Any) -> str:
    """`value` if it is a valid model name (or alias); else one error naming `kind` and the rule."""
    if not _valid_name(value):
        raise DistmlError(f"{kind} {value!r} is not valid; expected {NAME_RULE}")
    return value


def _is_number(text: str) -> bool:
    """Digits 0-9 only: `str.isdigit` also holds for '¹' or '²', which `int` refuses."""
    return text.isascii() and text.isdigit()


def parse_version(text: Any, name: str | None = None) -> int:
    """A positive version number from '3' (or 3), or from 'name:3' when `name` is given."""
    digits = str(text) if isinstance(text, (str, int)) and not isinstance(text, bool) else ""
    if name is not None and digits.startswith(f"{name}:"):
        digits = digits[len(name) + 1 :]
    if not _is_number(digits) or int(digits) < 1:
        example = f"3 or {name}:3" if name is not None else "3"
        raise DistmlError(f"model version {text!r} is not valid; expected a positive integer such as {example}")
    return int(digits)


@dataclass(frozen=True)
class ModelRef:
    """A reference to a stored model: exactly one of the forms below.

    - `name` alone: the latest registered version of `name`;
    - `name` and `version`: that version (pinned);
    - `name` and `alias`: the version the alias points at when resolved;
    - `digest` alone: the model manifest with that SHA-256 digest (pinned, may be unregistered).
    """

    name: str | None = None
    version: int | None = None
    alias: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: Any) -> ModelRef:
        """The reference `text` spells, or one DistmlError that quotes it and gives the grammar."""
        if isinstance(text, ModelRef):
            return text
        if not isinstance(text, str) or not text:
            raise DistmlError(f"model reference {text!r} is not valid; {GRAMMAR}")
        if DIGEST_PATTERN.match(text):
            return cls(digest=text)
        name, at, alias = text.partition("@")
        name, colon, version = name.partition(":")
        problem = None
        if at and colon:
            problem = "it names both a version and an alias"
        elif not _valid_name(name):
            problem = f"the name must be {NAME_RULE}"
        elif at and not _valid_name(alias):
            problem = f"the alias must be {NAME_RULE}"
        elif colon and not (_is_number(version) and int(version) >= 1):
            problem = "the version must be a positive integer"
        if problem is not None:
            raise DistmlError(f"model reference {text!r} is not valid ({problem}); {GRAMMAR}")
        if at:
            return cls(name=name, alias=alias)
        if colon:
            return cls(name=name, version=int(version))
        return cls(name=name)

    @classmethod
    def pinned(cls, text: Any) -> ModelRef:
        """Like `parse`, for places that need 'name:version' exactly (a version already resolved)."""
        ref = cls.parse(text)
        if ref.name is None or ref.version is None:
            raise DistmlError(f"model reference {text!r} is not valid here; expected NAME:VERSION such as cnn:3")
        return ref

    def __str__(self) -> str:
        if self.digest is not None:
            return self.digest
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return str(self.name)
