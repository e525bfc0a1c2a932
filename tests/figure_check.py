"""Checks every figure test uses: a figure draws something, is labelled, and holds its table.

* `check_figure(fig)`: a title; every trace has at least one finite point (legend-only traces
  and explorer slots, marked by ``trace.meta``, are exempt), and at least one trace does; every
  axis a trace is drawn on has a title; no frames (animations are gone) and a circuit explorer's
  steps each hold edges.
* `assert_trace_equals(trace, **columns)`: a trace's x / y / z / customdata equal given values.
* `trace_named(fig, name)`: the trace with that name.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

import numpy as np
import plotly.graph_objects as go

from circuitdyn import plots as P


def values(array: Any) -> np.ndarray:
    """A trace attribute as a flat float array (None / strings / typed-array dicts handled;
    categorical strings count as finite)."""
    if array is None:
        return np.zeros(0)
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).astype(float)
    flat = np.asarray(array, dtype=object).ravel()
    out = np.empty(len(flat))
    for i, v in enumerate(flat):
        if v is None:
            out[i] = np.nan
        elif isinstance(v, str):
            out[i] = 0.0
        elif isinstance(v, (list, tuple, np.ndarray)):
            inner = values(v)
            out[i] = 0.0 if np.isfinite(inner).any() else np.nan
        else:
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                out[i] = 0.0
    return out


def finite_points(trace: Any) -> int:
    """How many points of a trace have finite coordinates."""
    kind = trace.type
    if kind == "heatmap":
        return int(np.isfinite(values(trace.z)).sum())
    if kind == "sankey":
        return int((values(trace.link.value) > 0).sum())
    if kind == "bar":
        return int(np.isfinite(values(trace.y)).sum())
    x, y = values(trace.x), values(trace.y)
    if len(x) != len(y):
        return 0
    return int((np.isfinite(x) & np.isfinite(y)).sum())


def _axis_names(trace: Any) -> Iterable[str]:
    if trace.type == "sankey":
        return []
    x = getattr(trace, "xaxis", None) or "x"
    y = getattr(trace, "yaxis", None) or "y"
    return [x.replace("x", "xaxis", 1), y.replace("y", "yaxis", 1)]


def _axis_names_of(reference: str) -> str:
    return (
        reference.replace("x", "xaxis", 1)
        if reference.startswith("x")
        else reference.replace("y", "yaxis", 1)
    )


def check_figure(fig: go.Figure, name: str = "figure") -> None:
    """Assert that ``fig`` is a drawable, labelled figure (see the module docstring)."""
    assert fig.layout.title.text and fig.layout.title.text.strip(), f"{name}: no title"
    assert not fig.frames, f"{name}: has animation frames"
    exempt = (P.LEGEND_ONLY, P.SLOT)
    drawn = 0
    for i, trace in enumerate(fig.data):
        if trace.meta in exempt:
            continue
        n = finite_points(trace)
        assert n > 0, f"{name}: trace {i} ({trace.name!r}) has no finite point"
        drawn += 1
        for axis in _axis_names(trace):
            layout_axis = fig.layout[axis]
            assert layout_axis is not None, f"{name}: trace {i} on missing axis {axis}"
            if layout_axis.visible is False:
                continue
            if layout_axis.matches:  # a shared axis: its partner carries the title
                layout_axis = fig.layout[_axis_names_of(layout_axis.matches)]
            title = layout_axis.title.text if layout_axis.title else None
            assert title and title.strip(), f"{name}: {axis} (trace {trace.name!r}) has no title"
    assert drawn > 0, f"{name}: no trace with data"
    if P.is_widget(fig):
        spec = fig.layout.meta["circuitdyn"]
        assert spec["frames"], f"{name}: explorer without steps"
        assert spec["edges"], f"{name}: explorer without edges"


def check_figures(figs: dict[str, go.Figure]) -> None:
    """`check_figure` on every figure of a name -> figure mapping (at least one)."""
    assert figs, "no figures"
    for name, fig in figs.items():
        check_figure(fig, name)


def trace_named(fig: go.Figure, name: str) -> Any:
    """The first trace called ``name``."""
    for trace in fig.data:
        if trace.name == name:
            return trace
    raise AssertionError(f"no trace named {name!r}: {[t.name for t in fig.data]}")


def assert_trace_equals(trace: Any, **expected: Any) -> None:
    """Each attribute (``x``, ``y``, ``z``, ...) of ``trace`` equals the expected values
    (floats compared to 1e-6 relative, NaN equal to NaN, strings exactly)."""
    for attribute, want in expected.items():
        got = trace[attribute]
        if isinstance(got, dict) and "bdata" in got:
            got = values(got)
        got_array = np.asarray(got, dtype=object)
        want_array = np.asarray(want, dtype=object)
        assert got_array.shape == want_array.shape, (
            f"{attribute}: shape {got_array.shape} != {want_array.shape}"
        )
        numeric = all(
            isinstance(v, (int, float, np.integer, np.floating)) or v is None
            for v in want_array.ravel()
        )
        if numeric:
            np.testing.assert_allclose(
                values(got_array), values(want_array), rtol=1e-6, equal_nan=True
            )
        else:
            assert [str(v) for v in got_array.ravel()] == [str(v) for v in want_array.ravel()], (
                attribute
            )
