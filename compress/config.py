"""Base classes of every typed config: strict (unknown keys are errors) and versioned."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StepConfig(StrictModel):
    """What every algorithm step shares: which modules it touches.

    ``targets`` entries are a module class name (``Linear``), an fqn glob
    (``model.layers.*.mlp.*``) or ``re:<regex>`` on the fqn; ``ignore`` uses the
    same forms. A step whose targets match nothing is an error.
    """

    algorithm: str
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
