"""Analyses of recorded runs: pure functions from a `RunStore` (or several) to pandas tables.

* `runs`: a run's tuning config (or none), label, evaluations one row per step, and whether it
  finished (`run_progress`).
* `dynamics`: circuit size, churn (Jaccard), node entries / exits, stable core, per-layer
  composition, the circuit at a step as tables for the graph figure.
* `trajectories`: edge scores over steps, linear trends with t-test p-values, rank changes.
* `compare`: overlap of two circuits, before / during / after of one run, several runs (final
  evaluations, curves per strategy, intrinsic dimension).
* `heads`: attention to the subject and direct logit attribution of every head at checkpoints
  (needs the model).
* `timeline`: the step convention, key steps (metric zero crossing, accuracy levels), per-step
  normalised scores, the edge membership raster, entry / exit counts, ratio masks.
* `seeds`: runs that differ only in their seed, as mean and spread.
* `formation`: when each edge / node emerges and exits, the order of emergence, the phase
  transition of the task metric and the circuit changes near it, the faithfulness onset.
* `weights`: relative weight change per head and MLP at checkpoints (needs the initial model).
* `pareto`: comparisons of tuning strategies over rates and seeds: Pareto fronts of target
  accuracy versus forgetting, forgetting at matched target accuracy with t-intervals and paired
  tests, chance levels of circuit overlap and churn from random circuits of the same size.

Analyses never touch a live trainer, and read a store through its typed views (``store.graph``,
``store.config``); figures (`circuitdyn.plots`) take these tables. `circuitdyn.analysis.pipeline`
(every table and figure of a run, written as files) sits above the figures and is not imported
here.
"""

from circuitdyn.analysis.compare import (
    CircuitSets,
    IntrinsicDimension,
    circuit_from_checkpoint,
    compare_circuits,
    compare_steps,
    final_evals,
    intrinsic_dimension,
    membership_flows,
    phase_membership,
    phase_steps,
    strategy_curves,
)
from circuitdyn.analysis.dynamics import (
    attributed_steps,
    churn,
    circuit_evolution,
    circuit_sizes,
    circuit_tables,
    edge_info,
    edge_presence,
    jaccard,
    layer_composition,
    node_events,
    node_info,
    node_membership,
    node_presence,
    node_score_matrix,
    spread,
    stable_core,
)
from circuitdyn.analysis.formation import (
    FormationTables,
    PhaseTransition,
    changes_near,
    circuit_emergence,
    circuit_membership,
    emergence_raster,
    emergence_steps,
    faithfulness_onset,
    formation_summary,
    formation_tables,
    masked_faithfulness,
    phase_transition,
)
from circuitdyn.analysis.heads import head_role_changes, head_roles, head_roles_of_model
from circuitdyn.analysis.pareto import (
    best_rate,
    chance_overlap,
    compare_at_matched,
    interval,
    matched_points,
    matched_summary,
    pareto_front,
    strategy_fronts,
)
from circuitdyn.analysis.runs import (
    RunProgress,
    config_fields,
    evals_by_step,
    run_label,
    run_labels,
    run_progress,
    tuning_config,
)
from circuitdyn.analysis.seeds import (
    group_stores,
    over_seeds,
    run_group,
    seed_group,
    tables_over_seeds,
)
from circuitdyn.analysis.timeline import (
    STEP_AXIS,
    STEP_CONVENTION,
    churn_counts,
    column_shares,
    edge_membership,
    key_steps,
    marked_steps,
    mask_near_zero,
    run_key_steps,
    score_shares,
    step_descriptions,
    step_score_totals,
)
from circuitdyn.analysis.trajectories import (
    changing_edges,
    edge_trajectories,
    edge_trends,
    linear_trend,
    rank_changes,
    t_test_p_value,
    top_edges,
)
from circuitdyn.analysis.weights import (
    block_changes,
    checkpoint_parameters,
    final_weight_changes,
    model_at,
    weight_changes,
    where_weights_moved,
)

__all__ = [
    "STEP_AXIS",
    "STEP_CONVENTION",
    "CircuitSets",
    "FormationTables",
    "IntrinsicDimension",
    "PhaseTransition",
    "RunProgress",
    "attributed_steps",
    "best_rate",
    "block_changes",
    "chance_overlap",
    "changes_near",
    "changing_edges",
    "checkpoint_parameters",
    "churn",
    "churn_counts",
    "circuit_emergence",
    "circuit_evolution",
    "circuit_from_checkpoint",
    "circuit_membership",
    "circuit_sizes",
    "circuit_tables",
    "column_shares",
    "compare_at_matched",
    "compare_circuits",
    "compare_steps",
    "config_fields",
    "edge_info",
    "edge_membership",
    "edge_presence",
    "edge_trajectories",
    "edge_trends",
    "emergence_raster",
    "emergence_steps",
    "evals_by_step",
    "faithfulness_onset",
    "final_evals",
    "final_weight_changes",
    "formation_summary",
    "formation_tables",
    "group_stores",
    "head_role_changes",
    "head_roles",
    "head_roles_of_model",
    "interval",
    "intrinsic_dimension",
    "jaccard",
    "key_steps",
    "layer_composition",
    "linear_trend",
    "marked_steps",
    "mask_near_zero",
    "masked_faithfulness",
    "matched_points",
    "matched_summary",
    "membership_flows",
    "model_at",
    "node_events",
    "node_info",
    "node_membership",
    "node_presence",
    "node_score_matrix",
    "over_seeds",
    "pareto_front",
    "phase_membership",
    "phase_steps",
    "phase_transition",
    "rank_changes",
    "run_group",
    "run_key_steps",
    "run_label",
    "run_labels",
    "run_progress",
    "score_shares",
    "seed_group",
    "spread",
    "stable_core",
    "step_descriptions",
    "step_score_totals",
    "strategy_curves",
    "strategy_fronts",
    "t_test_p_value",
    "tables_over_seeds",
    "top_edges",
    "tuning_config",
    "weight_changes",
    "where_weights_moved",
]
