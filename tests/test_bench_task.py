"""`bench task` on the cheapest task: the record's fields, and FLOPs against the analytic ViT formula."""

from fourm_eval.bench_task import measure, table_rows


def test_bench_task_nyu_depth_smoke():
    r = measure("nyu-depth", "4m", "smoke", iters=1, warmup=0)  # in this process (the CLI uses a fresh one)
    for k in ("s_per_iter", "iters_per_s", "images_per_s", "peak_memory_bytes", "flops_per_iter",
              "achieved_flops_per_s", "backbone_forward_flops"):
        assert r[k] > 0, k
    pl = r["planner"]
    for k in ("backbone_flops_per_iter", "peak_flops", "s_per_iter_estimate", "implied_utilisation"):
        assert pl[k] > 0, k
    # FlopCounterMode's count of the backbone's forward (batch x 3 x 96 x 96) vs the planner's formula
    # (2 FLOPs per multiply-add over the Linears and the patch embedding, 4 N^2 D per block for attention);
    # both count the same matmuls, so 1% covers only rounding
    batch = r["backbone_input_shape"][0]
    assert abs(r["backbone_forward_flops"] / (batch * pl["backbone_forward_flops_per_image"]) - 1) < 0.01
    # the whole iteration (heads, backward) costs more than the backbone's forward
    assert r["flops_per_iter"] > 2 * r["backbone_forward_flops"]
    cols, rows = table_rows([r])
    assert len(rows) == 1 and len(rows[0]) == len(cols)
