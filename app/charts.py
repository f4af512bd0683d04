"""Plotly figures of the dashboard: plain functions from arrays and tables to figures, so pages
stay thin and the figures can be checked without a browser."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def heatmap(z, title: str, x_title: str, y_title: str, colorbar: str = "",
            colorscale: str = "Viridis", x=None, y=None) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=np.asarray(z, dtype=float), x=x, y=y, colorscale=colorscale,
                               colorbar={"title": {"text": colorbar}}))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50}, height=420)
    return fig


def lines(frame: pd.DataFrame, x: str, y: str, group: str, title: str, x_title: str, y_title: str,
          dashed: tuple[str, ...] = (), log_x: bool = False) -> go.Figure:
    fig = go.Figure()
    for i, (name, part) in enumerate(frame.groupby(group, sort=False)):
        fig.add_trace(go.Scatter(x=part[x], y=part[y], name=str(name), mode="lines+markers",
                                 line={"dash": "dash" if name in dashed else "solid",
                                       "color": PALETTE[i % len(PALETTE)]}))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=420,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def bars(groups: dict[str, np.ndarray], title: str, x_title: str, y_title: str,
         x=None, reference: float | None = None, reference_name: str = "") -> go.Figure:
    fig = go.Figure()
    for i, (name, values) in enumerate(groups.items()):
        xs = x if x is not None else np.arange(len(values))
        fig.add_trace(go.Bar(x=xs, y=np.asarray(values, dtype=float), name=str(name),
                             marker_color=PALETTE[i % len(PALETTE)]))
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dot", annotation_text=reference_name)
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, barmode="group",
                      height=400, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def stacked(frame: pd.DataFrame, x: str, parts: dict[str, str], title: str, x_title: str,
            y_title: str, line: tuple[str, str] | None = None) -> go.Figure:
    """Stacked bars of ``parts`` (column -> label) per ``x``; ``line`` = (column, label) on top."""
    fig = go.Figure()
    for i, (col, label) in enumerate(parts.items()):
        fig.add_trace(go.Bar(x=frame[x], y=frame[col], name=label, marker_color=PALETTE[i]))
    if line is not None:
        fig.add_trace(go.Scatter(x=frame[x], y=frame[line[0]], name=line[1], mode="lines",
                                 line={"color": "black", "width": 1}))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, barmode="stack",
                      bargap=0.05, height=420, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def histograms(series: dict[str, np.ndarray], title: str, x_title: str, bins: int = 40) -> go.Figure:
    fig = go.Figure()
    for i, (name, values) in enumerate(series.items()):
        fig.add_trace(go.Histogram(x=np.asarray(values, dtype=float), name=name, nbinsx=bins,
                                   opacity=0.75, marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="requests", barmode="overlay",
                      height=380, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


GANTT_COLOURS = {"attention": "#1f77b4", "experts": "#2ca02c", "dispatch": "#ff7f0e",
                 "combine": "#d62728", "dense": "#7f7f7f", "other": "#9467bd"}


def gantt(spans: pd.DataFrame, title: str) -> go.Figure:
    """Horizontal bars: ``spans`` has row, kind, start_ms, dur_ms, label."""
    fig = go.Figure()
    rows = list(dict.fromkeys(spans["row"]))
    for kind, part in spans.groupby("kind", sort=False):
        fig.add_trace(go.Bar(y=part["row"], x=part["dur_ms"], base=part["start_ms"], orientation="h",
                             name=kind, marker_color=GANTT_COLOURS.get(kind, GANTT_COLOURS["other"]),
                             hovertext=part["label"], hoverinfo="text+x"))
    fig.update_layout(title=title, xaxis_title="time in the step (ms)", barmode="overlay",
                      yaxis={"categoryorder": "array", "categoryarray": rows[::-1]},
                      height=max(300, 28 * len(rows) + 120), margin={"l": 120, "r": 20, "t": 50, "b": 50})
    return fig


def scatter_front(frame: pd.DataFrame, x: str, y: str, front: np.ndarray, colour: str | None,
                  title: str) -> go.Figure:
    fig = go.Figure()
    groups = frame.groupby(colour, sort=False) if colour else [("points", frame)]
    for i, (name, part) in enumerate(groups):
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers", name=f"{colour}={name}" if colour else name,
                                 marker={"size": 9, "color": PALETTE[i % len(PALETTE)], "opacity": 0.7},
                                 hovertext=[f"point {p}" for p in part.get("point", part.index)]))
    best = frame[front].sort_values(x)
    fig.add_trace(go.Scatter(x=best[x], y=best[y], mode="lines+markers", name="Pareto front",
                             line={"color": "black", "dash": "dot"},
                             marker={"size": 13, "symbol": "circle-open", "color": "black"}))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=460,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig
