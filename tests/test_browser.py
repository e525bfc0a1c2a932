"""The reports and figures in a real browser (headless Chromium): no console errors, every
figure drawn with points, the explorer's controls work, and every figure `replicate` writes
passes the figure check.

The browser is the system Chromium (``apt-get install chromium``; `.ci/run` installs it where
apt works), driven by the ``playwright`` package with ``executable_path`` (no browser
download). Without playwright, the page is loaded with ``chromium --dump-dom`` and its
``#render-all`` switch instead (fewer checks). Skipped only when Chromium is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from figure_check import check_figures

from circuitdyn.replicate import ARMS, replication_figures
from circuitdyn.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium): browser checks skipped",
)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def _render(path: Path, tmp_path: Path) -> dict:
    """Open the page, draw every figure, and return what the page recorded: ``figures``,
    ``drawn``, ``empty``, ``errors`` (uncaught), ``points`` (per figure), ``console`` (error
    and warning messages), and ``explorer`` (the step text before / after moving the slider,
    None without an explorer)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return _render_dump_dom(path, tmp_path)
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on(
            "console",
            lambda m: (
                console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
            ),
        )
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        page.goto(path.as_uri())
        page.wait_for_timeout(500)
        lazily = page.evaluate("document.body.getAttribute('data-figures-drawn')")
        page.evaluate("window.circuitdynRenderAll()")
        page.wait_for_function(
            "document.body.getAttribute('data-figures-drawn') === "
            "document.body.getAttribute('data-figures')",
            timeout=120_000,
        )
        state = page.evaluate(
            """() => ({
              figures: +document.body.getAttribute('data-figures'),
              drawn: +document.body.getAttribute('data-figures-drawn'),
              empty: +document.body.getAttribute('data-figures-empty'),
              errors: +document.body.getAttribute('data-js-errors'),
              points: Array.from(document.querySelectorAll('div.cd-plot')).map(
                d => [d.id, +d.getAttribute('data-points')]),
            })"""
        )
        state["lazily"] = int(lazily or 0)
        state["explorer"] = None
        if page.query_selector(".cd-step"):
            before = page.inner_text(".cd-step-text")
            page.evaluate(
                """() => { const i = document.querySelector('.cd-step');
                i.value = i.max; i.dispatchEvent(new Event('input')); }"""
            )
            state["explorer"] = (before, page.inner_text(".cd-step-text"))
        browser.close()
    state["console"] = console
    return state


def _render_dump_dom(path: Path, tmp_path: Path) -> dict:
    command = [CHROMIUM, "--headless", *ARGS, f"--user-data-dir={tmp_path / 'profile'}",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=30000", "--dump-dom",
               path.as_uri() + "#render-all"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    dom = done.stdout

    def attribute(name: str) -> int:
        match = re.search(rf'{name}="(\d+)"', dom)
        return int(match.group(1)) if match else -1

    points = re.findall(r'<div class="cd-plot[^"]*" id="(fig\d+)"[^>]*data-points="(\d+)"', dom)
    return {
        "figures": attribute("data-figures"),
        "drawn": attribute("data-figures-drawn"),
        "empty": attribute("data-figures-empty"),
        "errors": attribute("data-js-errors"),
        "points": [[i, int(n)] for i, n in points],
        "lazily": 0,
        "explorer": None,
        "console": [line for line in done.stderr.splitlines() if ":CONSOLE" in line],
    }


def _check_page(state: dict, minimum: int) -> None:
    assert not state["console"], "console messages:\n" + "\n".join(state["console"])
    assert state["errors"] == 0
    assert state["figures"] >= minimum
    assert state["drawn"] == state["figures"] and state["empty"] == 0
    empty = [i for i, n in state["points"] if n <= 0]
    assert not empty, f"figures without points: {empty}"


@needs_chromium
def test_single_run_report_in_chromium(replication_dir, tmp_path):
    path = build_report(
        [replication_dir / "runs" / "circuit-lr0.001_s0"], tmp_path / "one.html", model=False
    )
    state = _render(path, tmp_path)
    _check_page(state, minimum=12)
    if state["explorer"] is not None:  # the explorer's step slider redraws the circuit
        before, after = state["explorer"]
        assert before.startswith("t = 0") and after != before


@needs_chromium
def test_replication_report_in_chromium(replication_dir, tmp_path):
    path = replication_dir / "report.html"
    text = path.read_text()
    assert "Comparison of runs" in text and text.count('<details class="run"') == len(ARMS)
    state = _render(path, tmp_path)
    _check_page(state, minimum=40)
    # Lazy: only the figures near the top are drawn before scrolling.
    assert state["lazily"] < state["figures"]


@needs_chromium
def test_replication_figure_files_in_chromium(replication_dir, tmp_path):
    """The explorer's own HTML file (plotly.js beside it) draws and reacts without errors."""
    path = replication_dir / "figures" / "circuit_animation.html"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: the explorer's controls are not exercised")
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: console.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_selector(".cd-step")
        title = page.evaluate("document.querySelector('.js-plotly-plot').layout.title.text")
        page.click(".cd-keys button:last-child")  # the final key step
        page.wait_for_timeout(200)
        after = page.evaluate("document.querySelector('.js-plotly-plot').layout.title.text")
        browser.close()
    assert not console, console
    assert title != after and "step" in after


def test_every_replication_figure_passes_the_check(replication_dir):
    """Every figure `replicate` writes (rebuilt from the replication directory): data in every
    trace, titled axes; the README's small multiples show the key steps."""
    figs, _, _ = replication_figures(replication_dir)
    check_figures(figs)
    titles = [a.text for a in figs["circuit_key_steps"].layout.annotations]
    assert any("initial" in t for t in titles) and any("final" in t for t in titles)
    for name in figs:
        assert (replication_dir / "figures" / f"{name}.html").is_file(), name
