"""The exporter interface and the runner protocol every artifact loader returns."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from .deps import install_hint, is_importable
from .errors import BadInput, MissingDependency


@runtime_checkable
class Runner(Protocol):
    """Runs a loaded artifact: named numpy inputs in, named numpy outputs out."""

    input_names: list[str]
    output_names: list[str]
    available_for_prediction: bool

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class ExportResult:
    """Where the artifact was written and what happened on the way (exporter used, fallbacks, warnings...)."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict)


class Exporter(ABC):
    """One target format. Subclasses set the class attributes and implement ``export_with_info`` and ``load``."""

    name: ClassVar[str]
    suffix: ClassVar[str]
    extra: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[str, ...]] = ()

    def unavailable_reason(self) -> str | None:
        """Why this exporter cannot run here (one line naming the fix), or ``None`` when it can."""
        missing = [m for m in self.requires if not is_importable(m)]
        if missing:
            return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; {install_hint(self.extra)}"
        return None

    def available(self) -> bool:
        """Whether the dependencies of this exporter are importable."""
        return self.unavailable_reason() is None

    def ensure_available(self) -> None:
        """Raise :class:`MissingDependency` when :meth:`available` is False."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise MissingDependency(reason)

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Reject option names this exporter does not know, listing the valid ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise BadInput(
                f"unknown option(s) {', '.join(unknown)} for exporter '{self.name}'; valid: {', '.join(self.options) or 'none'}"
            )

    def export(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> Path:
        """Export ``model`` to ``path`` and return the path of the written artifact."""
        return self.export_with_info(model, example_inputs, path, **options).path

    @abstractmethod
    def export_with_info(
        self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any
    ) -> ExportResult:
        """Export and also return details (exporter used, fallbacks, sizes, warnings)."""

    @abstractmethod
    def load(self, path: str | os.PathLike[str], **options: Any) -> Runner:
        """Load an artifact written by this exporter as a :class:`Runner`."""

    @abstractmethod
    def inspect(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Check an artifact's structure without running it; raise :class:`CorruptArtifact` if it is broken."""
