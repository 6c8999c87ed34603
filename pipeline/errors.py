"""The one base class of demix's errors that name *what* failed and *where* (the stage).

``AudioError`` (read, decode, encode), ``StorageError`` (read, write) and ``TrackError`` (any stage of a
track) extend :class:`StagedError`. Its pickling keeps every attribute, so an error raised in a Ray
worker or a Prefect task arrives whole in the driver: subclasses need no ``__reduce__`` of their own.
"""

from __future__ import annotations


class StagedError(Exception):
    """An error with ``source`` (the file, URI or track it concerns) and ``stage`` (where it happened).

    ``stages``, when a subclass sets it, lists the stages it may carry; another is a ``ValueError``.
    """

    stages: tuple[str, ...] = ()

    def __init__(self, text: str, *, source: str, stage: str) -> None:
        if self.stages and stage not in self.stages:
            raise ValueError(f"{type(self).__name__} stage must be one of {self.stages}. Found: {stage!r}")
        super().__init__(text)
        self.source = str(source)
        self.stage = stage

    def __reduce__(self):
        # The default exception pickling calls cls(*args): wrong for keyword-only constructors.
        return (_restore, (type(self), self.args, self.__dict__.copy()))


def _restore(cls: type, args: tuple, state: dict) -> StagedError:
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


def stage_of(err: BaseException, default: str) -> str:
    """The stage ``err`` names (any :class:`StagedError`), else ``default``."""
    return err.stage if isinstance(err, StagedError) else default
