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
    """One target format. Subclasses set the class attributes and implement ``export_with_info``, ``load`` and
    ``inspect``; an exporter that can also convert another exporter's artifact names it in ``derives_from`` and
    implements ``derive``.

    ``runtime``: what runs the artifacts (default: the exporter's name). ``derives_from``: in a chain of exports
    (:func:`exporters.chain.plan_exports`) this exporter converts the artifact of that exporter instead of the
    torch module. ``transform``: ``derive`` rewrites a ``derives_from`` artifact into the same format (int8
    weights of an ONNX file); it runs only when asked for, and later steps deriving from that format convert
    the rewritten file. ``options`` / ``derive_options``: keyword options of ``export_with_info`` / ``derive``.
    """

    name: ClassVar[str]
    suffix: ClassVar[str]
    extra: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[str, ...]] = ()
    runtime: ClassVar[str] = ""
    derives_from: ClassVar[str | None] = None
    transform: ClassVar[bool] = False
    derive_options: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.runtime:
            cls.runtime = getattr(cls, "name", "")

    def file_name(self, stem: str = "model") -> str:
        """The artifact's file name for ``stem`` in an export folder (``model.onnx``, ``model.mlpackage``...)."""
        return stem + self.suffix

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

    def check_options(self, options: Mapping[str, Any], valid: tuple[str, ...] | None = None) -> None:
        """Reject option names this exporter does not know (``valid``, default ``options``), listing the valid ones."""
        known = self.options if valid is None else valid
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise BadInput(
                f"unknown option(s) {', '.join(unknown)} for exporter '{self.name}'; valid: {', '.join(known) or 'none'}"
            )

    def export(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> Path:
        """Export ``model`` to ``path`` and return the path of the written artifact."""
        return self.export_with_info(model, example_inputs, path, **options).path

    @abstractmethod
    def export_with_info(
        self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any
    ) -> ExportResult:
        """Export and also return details (exporter used, fallbacks, sizes, warnings)."""

    def derive(self, source: str | os.PathLike[str], path: str | os.PathLike[str], **options: Any) -> ExportResult:
        """Convert the artifact ``source`` written by the ``derives_from`` exporter into this format at ``path``."""
        raise BadInput(f"exporter '{self.name}' converts no other artifact; export a torch module with it instead")

    @abstractmethod
    def load(self, path: str | os.PathLike[str], threads: int | None = None, **options: Any) -> Runner:
        """Load an artifact written by this exporter as a :class:`Runner` (``threads``: intra-op threads, where
        the runtime takes a count)."""

    @abstractmethod
    def inspect(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Check an artifact's structure without running it; raise :class:`CorruptArtifact` if it is broken."""
