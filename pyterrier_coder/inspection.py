"""PyTerrier's ``pt.inspect`` support for components whose settings do not map one to one onto their constructor."""
from __future__ import annotations

import inspect


class InspectableSettings:
    """PyTerrier's ``pt.inspect`` protocols (``HasAttributes``, ``HasApplyAttributes``) for components whose
    constructor does not keep every argument under its own name (training settings live in a TrainingConfig, an
    encoder is cloned, a checkpoint is loaded), where pt.inspect's reading of the signature fails.

    ``attributes()`` lists the settings (what a pipeline's schematic in Jupyter shows);
    ``apply_attributes(**changes)`` (``pt.inspect.transformer_apply_attributes``) builds a new instance with some
    settings changed that keeps what this one has learnt, where rebuilding from the arguments alone would start
    again from the original checkpoint."""

    def init_arguments(self) -> dict:
        """Constructor keyword -> value describing this instance (named parameters, then the training settings
        that differ from the component's defaults)."""
        raise NotImplementedError

    def _rebuild_arguments(self) -> dict:
        """The constructor keywords that rebuild this instance with its current weights."""
        return self.init_arguments()

    def _adopt_trained_state(self, source, changes: dict) -> None:
        """Called on the instance built by ``apply_attributes``: take over what ``source`` learnt that the
        constructor did not copy."""

    def attributes(self) -> list:
        import pyterrier as pt
        values = dict(self.init_arguments())
        out = []
        for param in list(inspect.signature(type(self).__init__).parameters.values())[1:]:
            if param.kind == inspect.Parameter.VAR_KEYWORD:   # last: whatever no named parameter took
                value, values = values, {}
            elif param.name in values:
                value = values.pop(param.name)
            else:
                continue
            out.append(pt.inspect.TransformerAttribute(name=param.name, value=value, init_default_value=param.default,
                                                       init_parameter_kind=param.kind))
        return out

    def apply_attributes(self, **changes):
        new = type(self)(**{**self._rebuild_arguments(), **changes})
        new._adopt_trained_state(self, changes)
        return new
