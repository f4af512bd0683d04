"""``moesim comm ...``: all-to-all dispatch/combine and TP collectives under a cluster model."""

from __future__ import annotations

from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit

app = typer.Typer(help="Communication: MoE all-to-all and TP collectives.", no_args_is_help=True)

CLUSTER_OPT = typer.Option("h800-ib", "--cluster", help="Cluster preset or YAML file.")


def _routing(spec: str, ep: int, tokens: int, experts: int, top_k: int, gpus_per_node: int,
             dispatcher: str, seed: int, layer: int):
    """(src_gpu, expert_ids, experts, tokens per GPU) for --routing."""
    import numpy as np

    from moesim import comm

    if spec == "uniform":
        src, ids = comm.uniform_routing(ep, tokens, experts, top_k, seed)
        return src, ids, experts, tokens
    if spec == "deepep-test":
        limited = dispatcher == "deepep-normal" and ep > gpus_per_node
        src, ids = comm.deepep_test_routing(ep, tokens, experts, top_k, gpus_per_node,
                                            node_limited=limited, seed=seed)
        return src, ids, experts, tokens
    path = Path(spec)
    if path.suffix != ".parquet":
        from moesim.errors import unknown_name

        raise unknown_name("routing", spec, ["uniform", "deepep-test", "TRACE.parquet"])
    from moesim.traces import Trace

    trace = Trace.read(path)
    if trace.is_counts:
        raise comm.CommError(f"{path}: a counts-only trace has no token-level routing")
    if not 0 <= layer < trace.meta.num_layers:
        raise comm.CommError(f"layer {layer} is outside 0..{trace.meta.num_layers - 1}")
    want, rows = ep * tokens, []
    for batch in trace.iter_batches():
        rows.append(batch.expert_ids[batch.layer == layer])
        if sum(len(r) for r in rows) >= want:
            break
    ids = np.concatenate(rows)[:want] if rows else np.zeros((0, trace.meta.top_k), int)
    per = len(ids) // ep
    if per == 0:
        raise comm.CommError(f"{path}: layer {layer} has {len(ids)} tokens, fewer than EP {ep}")
    ids = ids[: per * ep].astype(np.int64)  # execution order, cut into EP equal batches
    return np.repeat(np.arange(ep), per), ids, trace.meta.num_experts, per


@app.command("alltoall")
def alltoall(
    cluster: str = CLUSTER_OPT,
    ep: int = typer.Option(8, "--ep", help="Expert-parallel ranks (GPUs)."),
    tokens_per_gpu: int = typer.Option(4096, "--tokens-per-gpu", help="Tokens each rank routes."),
    hidden: int = typer.Option(7168, "--hidden", help="Hidden size."),
    experts: int = typer.Option(256, "--experts", help="Routed experts (ignored for traces)."),
    top_k: int = typer.Option(8, "--top-k", help="Experts per token."),
    routing: str = typer.Option("uniform", "--routing",
                                help="uniform | deepep-test | TRACE.parquet"),
    dispatcher: str = typer.Option("flat", "--dispatcher",
                                   help="flat | deepep-normal | deepep-ll | allgather | "
                                        "hierarchical"),
    dispatch_dtype: str = typer.Option("bf16", "--dispatch-dtype", help="fp8 | bf16"),
    combine_dtype: str = typer.Option("bf16", "--combine-dtype", help="bf16 | fp8"),
    placement: Path = typer.Option(None, "--placement", help="Plan JSON (expert_gpu or "
                                                             "physical_to_logical_map)."),
    selection: str = typer.Option("random", "--selection",
                                  help="Replica choice: random | nearest | round-robin"),
    layer: int = typer.Option(0, "--layer", help="Layer of the trace / plan to use."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated routing."),
    matrices: bool = typer.Option(False, "--matrices",
                                  help="Add the count matrices X, Y, Z to the output."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Model one MoE layer's dispatch and combine time."""
    from moesim import comm, hardware

    comm.get_dispatcher(dispatcher)
    base = hardware.load_cluster(cluster)
    if ep > base.num_gpus:
        raise hardware.HardwareError(f"EP {ep} exceeds the {base.num_gpus} GPUs of {base.name!r}")
    sub = base.for_ep(ep)
    src, ids, n_experts, per = _routing(routing, ep, tokens_per_gpu, experts, top_k,
                                        base.gpus_per_node, dispatcher, seed, layer)
    if placement is not None:
        plan = comm.Placement.from_json(placement, ep, layer=layer, selection=selection, seed=seed)
    else:
        plan = comm.Placement.contiguous(n_experts, ep, selection=selection, seed=seed)
    counts = comm.counts_from_tokens(src, ids, plan, sub)
    result = comm.layer_comm(sub, hidden=hidden, dispatcher=dispatcher, counts=counts,
                             dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)
    payload = {"cluster": base.name, "ep": ep, "nodes": sub.num_nodes, "tokens_per_gpu": per,
               "experts": n_experts, "top_k": int(ids.shape[1]), "routing": routing,
               **result.to_dict(), "counts": counts.summary()}
    if matrices:  # [src GPU][dst GPU] for X and Z, [src GPU][node] for Y
        payload["matrices"] = {k: getattr(counts, k).tolist() for k in ("X", "Y", "Z")}
    emit(payload, as_json, _render)


def _render(p: dict) -> None:
    typer.echo(f"{p['dispatcher']} on {p['cluster']} EP{p['ep']} ({p['nodes']} node(s)), "
               f"{p['tokens_per_gpu']} tokens/GPU, top-{p['top_k']} of {p['experts']}")
    typer.echo(f"  dispatch {p['dispatch_s'] * 1e6:10.1f} us  "
               f"{p['dispatch_logical_gbps']:7.1f} GB/s logical")
    typer.echo(f"  combine  {p['combine_s'] * 1e6:10.1f} us  "
               f"{p['combine_logical_gbps']:7.1f} GB/s logical")
    typer.echo(f"  bottleneck: {p['bottleneck']}")
    c = p["counts"]
    typer.echo(f"  GPUs/token {c['gpus_per_token']:.2f}, nodes/token {c['nodes_per_token']:.2f}, "
               f"max/mean GPU load {c['max_over_mean_gpu_load']:.3f}")


def _collective(kind: str, cluster: str, ranks: int, nbytes: float, as_json: bool) -> None:
    from moesim import comm, hardware

    c = hardware.load_cluster(cluster)
    if ranks > c.num_gpus or ranks < 1:
        raise hardware.HardwareError(f"{ranks} ranks do not fit the {c.num_gpus} GPUs of {c.name!r}")
    fn = {"allreduce": comm.allreduce_time, "allgather": comm.allgather_time,
          "reducescatter": comm.reduce_scatter_time}[kind]
    t = fn(c, nbytes, ranks)
    factor = 2 * (ranks - 1) / ranks if kind == "allreduce" else (ranks - 1) / ranks
    algbw = nbytes / t if t > 0 else 0.0
    emit({"collective": kind, "cluster": c.name, "ranks": ranks, "bytes": nbytes, "time_s": t,
          "algbw_gbps": algbw / 1e9, "busbw_gbps": algbw * factor / 1e9}, as_json)


@app.command("allreduce")
def allreduce(cluster: str = CLUSTER_OPT, ranks: int = typer.Option(8, "--ranks"),
              nbytes: float = typer.Option(2**28, "--bytes", help="Bytes per rank."),
              as_json: bool = JSON_OPTION) -> None:
    """Ring all-reduce time (nccl-tests busbw convention)."""
    _collective("allreduce", cluster, ranks, nbytes, as_json)


@app.command("allgather")
def allgather(cluster: str = CLUSTER_OPT, ranks: int = typer.Option(8, "--ranks"),
              nbytes: float = typer.Option(2**28, "--bytes", help="Gathered bytes per rank."),
              as_json: bool = JSON_OPTION) -> None:
    """Ring all-gather time."""
    _collective("allgather", cluster, ranks, nbytes, as_json)


@app.command("presets")
def presets(as_json: bool = JSON_OPTION) -> None:
    """List cluster, device and machine presets with their sources."""
    from moesim import hardware

    payload = {
        "clusters": {n: hardware.get_cluster(n).source for n in hardware.cluster_names()},
        "devices": {n: hardware.get_device(n).source for n in hardware.device_names()},
        "machines": {n: hardware.get_machine(n).source for n in hardware.machine_names()},
    }
    emit(payload, as_json)
