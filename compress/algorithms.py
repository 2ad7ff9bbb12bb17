"""The algorithm registry: a name, a typed config class, the step that applies it, and what it
declares about the run state (``compress.state.Fact``: produces, needs, invalidates).

``apply(model, config, ctx) -> dict`` mutates the model in place and returns a JSON-able report.
A package registers its algorithms where their configs live (its ``config.py``) and names each
step function as ``Deferred("package.module", "function")``: reading the registry — building the
recipe schema, checking a recipe's order — imports no torch; the step's module is imported when
the step first runs. Algorithms that need calibration data say so, and the pipeline builds the
calibration set only when some step needs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from compress.config import StepConfig, StrictModel
from compress.deferred import Deferred
from compress.state import Fact, RunState


@dataclass(frozen=True)
class Algorithm:
    name: str
    config: type[StrictModel]
    apply: Callable[..., dict]
    requires_calibration: bool
    produces: frozenset[Fact] = frozenset()
    needs: frozenset[Fact] = frozenset()
    invalidates: frozenset[Fact] = frozenset()
    doc: str = ""

    @property
    def uses_float_weights(self) -> bool:
        return Fact.FLOAT_WEIGHTS in self.needs

    @property
    def takes_targets(self) -> bool:
        return issubclass(self.config, StepConfig)


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, config: type[StrictModel], *, step: Callable[..., dict] | None = None,
                       requires_calibration: bool, produces: Iterable[Fact] = (), needs: Iterable[Fact] = (),
                       invalidates: Iterable[Fact] = (), uses_float_weights: bool = False, doc: str = ""):
    """Register ``name``. With ``step`` (a function or a Deferred) it is registered at once; without,
    this is a decorator for the step function. ``uses_float_weights`` is ``needs={FLOAT_WEIGHTS}``."""
    needs = set(needs) | ({Fact.FLOAT_WEIGHTS} if uses_float_weights else set())

    def add(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} registered twice")
        text = doc or ("" if isinstance(fn, Deferred) else fn.__doc__ or "")  # a Deferred's would import it
        ALGORITHMS[name] = Algorithm(name, config, fn, requires_calibration, frozenset(produces), frozenset(needs),
                                     frozenset(invalidates), text.strip())
        return fn

    return add(step) if step is not None else add


@dataclass
class StepContext:
    """What a step may use besides the model: the data, the device, the results of earlier steps."""

    tokenizer: Any
    device: Any
    calibration: Any = None  # a CalibrationSet, when some step requires one
    batch_size: int = 8
    progress: bool = True
    where: str = "step"  # YAML path of the step, for error messages
    state: RunState = field(default_factory=RunState)  # what earlier steps left (compress.state)
    # Set by the pipeline when a later step needs FLOAT_WEIGHTS: quantizing steps then keep
    # each module's pre-quantization weight in state.float_weight[fqn] (on the CPU).
    keep_float_weights: bool = False
    # Where the activations between blocks live (calibration.activations): host, device or auto.
    activations: str = "host"

    def offload(self, model) -> Any:
        """The device that holds the calibration activations between blocks for ``model``."""
        from compress.runner import activation_home

        return activation_home(self.activations, self.device, self.calibration, model)
