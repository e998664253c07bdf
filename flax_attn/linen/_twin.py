"""The base of the Linen twins: their option fields are generated from the block's spec.

A twin declares ``Spec`` (a spec class of :mod:`flax_attn.layers.specs`) and its own fields (``channels``
first, then ``dtype``, ``param_dtype`` ...); the spec's options are inserted as dataclass fields after
``channels``, with the spec's types and defaults, so the NNX block and its twin share one option list.
The module validates its options once, by building ``self.spec``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from flax import linen as nn

from flax_attn.layers.specs import BlockSpec, check_channels


class SpecModule(nn.Module):
    """A Linen module whose keyword options are the fields of ``Spec``; ``self.spec`` holds them validated."""

    Spec: ClassVar[Any] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        spec_cls = cls.__dict__.get("Spec")
        if spec_cls is not None:
            own = dict(inspect.get_annotations(cls))
            head = {"channels": own.pop("channels")} if "channels" in own else {}
            options = spec_cls.options()
            cls.__annotations__ = {**head, **{p.name: p.annotation for p in options}, **own}
            for p in options:
                setattr(cls, p.name, p.default)
        super().__init_subclass__(**kwargs)

    def __post_init__(self) -> None:
        check_channels(self.channels)  # type: ignore[attr-defined]
        spec = self.Spec.from_options(**{p.name: getattr(self, p.name) for p in self.Spec.options()})
        object.__setattr__(self, "spec", spec)  # derived from the fields: not a field, rebuilt by clone()
        super().__post_init__()

    @classmethod
    def from_spec(cls, channels: int, spec: BlockSpec, **module_kwargs: Any) -> SpecModule:
        """The twin of ``channels`` channels with the options of ``spec`` (``module_kwargs``: ``dtype``,
        ``param_dtype``, ``name`` ...)."""
        if not isinstance(spec, cls.Spec):
            raise TypeError(f"spec must be a {cls.Spec.__name__}, got {type(spec).__name__}")
        return cls(channels, **spec.to_options(), **module_kwargs)
