"""circuitdyn: find circuits, circuit-tune them, and record how circuits change while a model learns.

The public API::

    from circuitdyn import load_model, load_task, Graph, attribute, Circuit, select, faithfulness
    from circuitdyn import TuningConfig, tune, RunStore
    from circuitdyn import analysis, plots           # tables and figures of a run

Extension points, one registry each (see `circuitdyn.registry`): `METHODS` (attribution),
`ABLATIONS`, `SELECTIONS`, `TASKS`, `STRATEGIES` (tuning) and `POLICIES` (parameters).
"""

from circuitdyn.activations import ABLATIONS
from circuitdyn.attribution import METHODS, attribute
from circuitdyn.circuit import Circuit
from circuitdyn.config import TuningConfig
from circuitdyn.distributed import DistContext
from circuitdyn.evaluate import (
    MIB_GRID,
    Faithfulness,
    cmd,
    cpr,
    faithfulness,
    faithfulness_curve,
    run_with_circuit,
)
from circuitdyn.graph import Graph, UnsupportedModelError, parse_node
from circuitdyn.models import load_model, save_model
from circuitdyn.ownership import POLICIES, ParameterPolicy, count_tunable, parameter_masks
from circuitdyn.recorder import CircuitRecorder, track_checkpoints
from circuitdyn.registry import Registry
from circuitdyn.scores import Scores
from circuitdyn.selection import SELECTIONS, Selection, select
from circuitdyn.store import RunStore
from circuitdyn.strategies import STRATEGIES
from circuitdyn.tasks import TASKS, Batch, Task, accuracy, lm_loss, load_task, logit_diff
from circuitdyn.tuning import tune

__version__ = "0.1.0"

__all__ = [
    "ABLATIONS",
    "METHODS",
    "MIB_GRID",
    "POLICIES",
    "SELECTIONS",
    "STRATEGIES",
    "TASKS",
    "Batch",
    "Circuit",
    "CircuitRecorder",
    "DistContext",
    "Faithfulness",
    "Graph",
    "ParameterPolicy",
    "Registry",
    "RunStore",
    "Scores",
    "Selection",
    "Task",
    "TuningConfig",
    "UnsupportedModelError",
    "accuracy",
    "attribute",
    "cmd",
    "count_tunable",
    "cpr",
    "faithfulness",
    "faithfulness_curve",
    "lm_loss",
    "load_model",
    "load_task",
    "logit_diff",
    "parameter_masks",
    "parse_node",
    "run_with_circuit",
    "save_model",
    "select",
    "track_checkpoints",
    "tune",
]
