"""The RunContext a task's ``runner_parts`` receives, built as the shared runner builds it (its own
``run_context``, the backbone's real look-up, the per-size resolution), for tests that build configs."""

from pathlib import Path


def run_context_for(task, p: dict, data, predictions_dir: Path, backbone: str = "4m-tiny", seed: int = 0):
    from fourm_eval.backbones import backbone_info
    from fourm_eval.tasks.profiles import resolve_per_size, resolve_size
    from fourm_eval.tasks.runner import run_context

    info = backbone_info(backbone, None, False)
    size, _ = resolve_size(info["embed_dim"], info["num_layers"], None)
    p = resolve_per_size(p, size)
    p["model_size"] = size
    return run_context(task, p, data, name=backbone, checkpoint=None, info=info,
                       options=task.backbone_options(p, backbone, info), world=1, seed=seed,
                       predictions_dir=predictions_dir)
