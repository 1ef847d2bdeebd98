"""The hull greedy: per layer, the lower convex hull of (cost, loss, choice) options; then the
step with the largest loss decrease per unit of cost, while the budget allows. Serves
parameter budgets over a method's options and latency budgets over measured costs."""

from __future__ import annotations

from typing import Any

Option = tuple[Any, float, Any]


def hull(options: list[Option]) -> list[Option]:
    """Lower convex hull of (cost, loss, choice) options, cheapest first."""
    pts = sorted(options, key=lambda o: (o[0], o[1]))
    front: list[Option] = []
    for p in pts:
        if front and p[1] >= front[-1][1]:
            continue  # dominated
        while len(front) >= 2:
            (x1, y1, _), (x2, y2, _) = front[-2], front[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # front[-1] above the chord
                front.pop()
            else:
                break
        front.append(p)
    return front


def hull_greedy(hulls: dict[str, list[Option]], budget: float, tol: float = 0.0) -> dict[str, Any]:
    """Start every layer at the cheapest point of its lower convex hull of (cost, loss, choice)
    and take, while one fits ``budget`` (+ ``tol``), the step with the largest loss decrease per
    unit of cost. Returns name -> choice."""
    pos = dict.fromkeys(hulls, 0)
    spent = sum(h[0][0] for h in hulls.values())
    while True:
        best, best_gain = None, 0.0
        for name, h in hulls.items():
            i = pos[name]
            if i + 1 < len(h):
                dc = h[i + 1][0] - h[i][0]  # hull costs strictly increase
                gain = (h[i][1] - h[i + 1][1]) / dc
                if spent + dc <= budget + tol and gain > best_gain:
                    best, best_gain = name, gain
        if best is None:
            break
        spent += hulls[best][pos[best] + 1][0] - hulls[best][pos[best]][0]
        pos[best] += 1
    return {name: h[pos[name]][2] for name, h in hulls.items()}
