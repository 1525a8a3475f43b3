"""Optimisers shared by the annotators' model fits (SMPL-X bodies, 3DMM heads).

:func:`lbfgs_per_problem` fits several independent problems (the clips of one call) in one batched evaluation per
step, each with its own L-BFGS state: the fits are bound by kernel launches and host reads, not by arithmetic, so a
GPU fits several clips for little more than the time of one.
"""
from __future__ import annotations

import warnings

import torch


def lbfgs_per_problem(params: list[torch.Tensor], owners: list[torch.Tensor], objective, n: int, iters: int,
                      history: int = 20, c1: float = 1e-4, c2: float = 0.9, max_halvings: int = 12,
                      max_doublings: int = 4, cuda_graph: bool = True) -> None:
    """L-BFGS on ``n`` independent problems at once, in place: ``objective()`` gives each problem's value (n,), row
    ``i`` of ``params[k]`` belongs to problem ``owners[k][i]``. Every evaluation is one batched forward and backward
    for all problems (what makes several clips per fit cheap on a GPU), but each problem keeps its own curvature
    pairs and its own step (Armijo backtracking from 1; a full step that still descends steeply, by the curvature
    condition ``c2``, is doubled while that keeps decreasing, up to ``max_doublings`` times: without it the 3DMM fit's
    flat rotation-expression valley ended 2.8 instead of 1.6 degrees from the truth): one L-BFGS over their sum shares
    one step and one history,
    and a clip fitted beside others converged more slowly than alone (16.9 vs 4.0 px after 150 iterations). The
    variables live in one flat vector with each entry's problem beside it, and a per-problem dot product is one
    product with the (n, entries) 0/1 matrix of owners (an ``index_add_`` onto n bins was tens of thousands of
    atomic adds onto a few addresses).

    ``cuda_graph``: on a GPU, one evaluation (the parameters set from the flat vector, the objective, its gradient)
    is captured once as a CUDA graph and replayed: it is a few hundred small kernels whose launches, not their
    arithmetic, set its time. Any other device, or a capture that fails (a warning), evaluates eagerly; the
    arithmetic is the same either way."""
    owner = torch.cat([o.repeat_interleave(x[0].numel() if len(x) else 1) for x, o in zip(params, owners)])
    sizes = [x.numel() for x in params]
    x = flat([q.detach() for q in params])
    member = torch.zeros(n, len(owner), device=x.device, dtype=x.dtype)
    member[owner, torch.arange(len(owner), device=x.device)] = 1

    def dot(a, b):  # (n,) per-problem inner products of flat vectors
        return member @ (a * b)

    def put(x):
        with torch.no_grad():
            for q, v in zip(params, torch.split(x, sizes)):
                q.copy_(v.view_as(q))

    def evaluate_at(x):
        put(x)
        with torch.enable_grad():
            f = objective()
            grads = torch.autograd.grad(f.sum(), params, allow_unused=True)
        return f.detach(), flat([torch.zeros_like(q) if d is None else d for q, d in zip(params, grads)])

    evaluate = evaluate_at
    if cuda_graph and x.is_cuda:
        try:
            evaluate = graphed(evaluate_at, x)
        except RuntimeError as e:  # an op the capture refuses: the same evaluation, eagerly
            warnings.warn(f"lbfgs_per_problem: the evaluation could not be captured as a CUDA graph ({e}); "
                          "evaluating eagerly", stacklevel=2)
    f, g = evaluate(x)
    S, Y, R = [], [], []  # curvature pairs and 1 / (y . s) per problem (0 where a pair was not usable)
    gamma = (1.0 / dot(g.abs(), torch.ones_like(g)).clamp(min=1e-12)).clamp(max=1.0)
    for _ in range(iters):
        q, alphas = g.clone(), []
        for s, y, r in reversed(list(zip(S, Y, R))):
            a = r * dot(s, q)
            alphas.append(a)
            q -= a[owner] * y
        q *= gamma[owner]
        for (s, y, r), a in zip(zip(S, Y, R), reversed(alphas)):
            q += (a - r * dot(y, q))[owner] * s
        d = -q
        gtd = dot(g, d)
        uphill = (gtd >= 0)[owner]  # not a descent direction (a stale pair): steepest descent for that problem
        d = torch.where(uphill, -g, d)
        gtd = dot(g, d)
        t = torch.ones(n, device=f.device, dtype=f.dtype)
        done = torch.zeros(n, dtype=torch.bool, device=f.device)
        for _ in range(max_halvings):
            f_new, g_new = evaluate(x + t[owner] * d)
            done |= torch.isfinite(f_new) & (f_new <= f + c1 * t * gtd)
            if bool(done.all()):
                break
            t = torch.where(done, t, t * 0.5)  # an accepted problem keeps its step (and its evaluated point)
        if not bool(done.all()):  # no decrease found: that problem stays where it was
            t = torch.where(done, t, torch.zeros_like(t))
            f_new, g_new = evaluate(x + t[owner] * d)
        growing = done & (t >= 1)  # accepted a full step: may go further
        for _ in range(max_doublings):
            growing &= dot(g_new, d) < c2 * gtd  # still steeply downhill there
            if not bool(growing.any()):
                break
            t_try = torch.where(growing, 2 * t, t)
            f_try, g_try = evaluate(x + t_try[owner] * d)
            growing &= torch.isfinite(f_try) & (f_try <= f + c1 * t_try * gtd) & (f_try < f_new)
            t = torch.where(growing, t_try, t)
            f_new, g_new = torch.where(growing, f_try, f_new), torch.where(growing[owner], g_try, g_new)
        s, y = t[owner] * d, g_new - g
        ys, yy = dot(y, s), dot(y, y)
        usable = ys > 1e-10
        S.append(s)
        Y.append(y)
        R.append(torch.where(usable, 1.0 / ys.clamp(min=1e-10), torch.zeros_like(ys)))
        gamma = torch.where(usable, ys / yy.clamp(min=1e-20), gamma)
        if len(S) > history:
            S.pop(0), Y.pop(0), R.pop(0)
        x, f, g = x + s, f_new, g_new
    put(x)  # the last evaluation may have been a rejected longer step


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def graphed(fn, x: torch.Tensor):
    """``fn(x) -> tuple of tensors`` captured once as a CUDA graph at ``x``'s shape: each call copies its argument
    into the graph's input, replays, and returns copies of the outputs. ``fn`` must not synchronise with the host
    nor make host tensors (capture refuses both with a RuntimeError); its lazy initialisations run in a warm-up
    call on a side stream first, as torch.cuda.graph's documentation asks."""
    static_x = x.clone()
    stream = torch.cuda.Stream(device=x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        fn(static_x)
    torch.cuda.current_stream(x.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn(static_x)

    def call(x: torch.Tensor):
        static_x.copy_(x)
        graph.replay()
        return tuple(o.clone() for o in outs)

    return call
