"""The task contract: everything shared code may know about a transfer task.

A task is **one module** in this package that defines ``TASK = <a Task subclass
instance>``, plus its profiles ``configs/<name>.{paper,short,smoke}.yaml``. The
registry (``fourm_eval.tasks.get_task`` / ``all_tasks``) finds it; the CLI
(``run``, ``evaluate``, ``data make-mini``, ``data check``), the shared runner,
``doctor``, ``results``, ``report``, ``regress`` and the CI gate know tasks only
through the attributes and methods below, never by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Metric:
    """One number a task reports, as stored in ``result.json``."""

    name: str                      # the record's key, e.g. "box_AP"
    unit: str = "fraction"         # "fraction" (tables show x100, "points"), or an SI unit such as "m"
    higher_is_better: bool = True
    main: bool = False             # a column of the paper-style table
    gated: bool = False            # watched by the CI regression gate (`regress --update` default)
    description: str = ""

    @property
    def display_scale(self) -> float:
        return 100.0 if self.unit == "fraction" else 1.0


@dataclass
class PreparedData:
    """What a task's data check hands to the shared runner."""

    root: Path
    n_train: int                   # training images actually used (after subsets and skips)
    n_val: int
    record: dict[str, Any]         # the record's ``dataset`` section (hashes, counts, classes, skips)
    private: dict[str, Any] = field(default_factory=dict)  # task-only state (annotation files, class ids)


@dataclass(frozen=True)
class RunContext:
    """What the shared runner hands to :meth:`Task.runner_parts`, in one object. The contract test
    builds it with the same function (:func:`fourm_eval.tasks.runner.run_context`).

    ``backbone_cfg`` is ``FourmEvalViT``'s config (``tasks/mm.py``), resolved by the runner: ``name``,
    ``checkpoint`` (None: random init), ``allow_pickle``, ``drop_path_rate`` (profile ``drop_path``),
    ``grad_checkpointing``, ``num_heads`` (only when given for a 4M file without metadata), ``img_size``
    (timm baselines: profile ``image_size``), and every option of :meth:`Task.backbone_options`.
    A task adds only its own keys (e.g. ``out_indices``, ``final_norm``)."""

    profile: dict[str, Any]        # the resolved profile: --set applied, per-size values resolved, model_size
    data: PreparedData             # this task's check_data result
    backbone_cfg: dict[str, Any]
    embed_dim: int                 # the backbone's token width
    num_layers: int                # its number of blocks (for heads that read several depths)
    schedule: dict[str, Any]       # tasks.runner.schedule(): max_iters, val_interval, checkpoint_interval, ...
    seed: int
    predictions_dir: Path          # where every validation writes its predictions (the last one stays)


class Task(ABC):
    name: ClassVar[str]            # "coco-det": the CLI name, the record's ``task``
    title: ClassVar[str]           # one line for listings
    data_kind: ClassVar[str]       # short dataset name for `fourm-eval data make-mini|check KIND`
    metrics: ClassVar[tuple[Metric, ...]]
    requires: ClassVar[tuple[str, ...]]  # `doctor` check names this task needs (e.g. "mmdet", "mmcv ops")
    prediction_format: ClassVar[str]     # one line: what the saved predictions are
    mm_scope: ClassVar[str]        # the OpenMMLab default scope of its runner ("mmdet", "mmseg")
    settings: ClassVar[tuple] = () # its profile keys beyond the runner's (``tasks.schema.Setting``; kit's included)
    probe_only: ClassVar[bool] = False   # a frozen-feature probe (tasks/probe_run.py): no mmengine model, no training
    base_scaled_lr: ClassVar[bool] = False  # its protocols write blr (per 256 images); a bare lr is an error

    mini_data: ClassVar[str]       # module of its built-in mini dataset: make(out, seed=...) and default()
    # training images of the real dataset as published (``fourm-eval plan`` turns epochs into iterations)
    reference_train_images: ClassVar[int | None] = None

    # ---------------------------------------------------------------- data
    def make_mini(self, out: Path, seed: int = 0) -> Path:
        """Write the deterministic synthetic mini dataset in the real on-disk layout."""
        return self._mini_module().make(out, seed=seed)

    def default_data_root(self) -> Path:
        """The built-in mini dataset (generated once, cached), used when no data root is given."""
        return self._mini_module().default()

    def _mini_module(self) -> Any:
        import importlib
        return importlib.import_module(self.mini_data)

    @abstractmethod
    def data_identity(self, root: Path) -> dict[str, Any]:
        """Cheap fingerprints of the dataset (annotation hashes) for the run directory's identity."""

    @abstractmethod
    def check_data(self, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                   log: Log, progress: Progress | None = None) -> PreparedData:
        """Validate the layout (named errors), and prepare what the runner needs.
        ``progress(label, done, total)`` reports long checks (every image decodes)."""

    def convert(self, sources: list[Path], out: Path, log: Log) -> Path:
        """Write the task's layout under ``out`` from the dataset's official release files
        (``fourm-eval data convert KIND SOURCES... OUT``). Most datasets need none."""
        from fourm_eval.errors import ConfigError
        raise ConfigError(f"{self.name}: there is no converter for its data ({self.data_kind}); the data is read "
                          "in its official layout as released (see `fourm-eval data check`)")

    # ------------------------------------------------------- model, runner
    def backbone_options(self, p: dict[str, Any], backbone: str, info: dict[str, Any]) -> dict[str, Any]:
        """Extra ``build_backbone`` options the profile asks for (e.g. windowed attention); recorded."""
        return {}

    def register_mm(self) -> None:
        """Import/register the OpenMMLab modules the task's config names (idempotent)."""

    @abstractmethod
    def runner_parts(self, ctx: RunContext) -> dict[str, Any]:
        """``model``, ``train_dataset``, ``val_dataset`` and ``val_evaluator`` configs for mmengine
        (the shared runner wraps the datasets in loaders and adds loop, optimiser and hooks).

        The evaluator writes the predictions of every validation into ``ctx.predictions_dir``
        (the last one stays: the final model's)."""

    def verify_runner(self, runner: Any, data: PreparedData) -> None:
        """Checks on the built runner before training (e.g. the datasets' class order)."""

    # ------------------------------------------------ metrics, predictions
    @abstractmethod
    def record_metrics(self, evaluator_out: dict[str, float]) -> dict[str, float]:
        """Evaluator output -> the record's metric names and units (every ``metrics`` name)."""

    @abstractmethod
    def evaluate(self, predictions: Path, data_root: Path, protocol: str | None = None,
                 log: Any = None) -> dict[str, float]:
        """Score a predictions file or folder in the task's standard format (ours or another
        project's) with the task's metric; malformed input is a named error. ``protocol``: score as
        that protocol scores (tasks whose protocols score alike ignore it); ``log``: a line printer."""

    @abstractmethod
    def footnote(self, record: dict[str, Any]) -> str:
        """The protocol footnote for a record (head, resolution, schedule, tuning mode)."""

    # ------------------------------------------------------------ derived
    def metric(self, name: str) -> Metric | None:
        return next((m for m in self.metrics if m.name == name), None)

    @property
    def main_metrics(self) -> list[str]:
        return [m.name for m in self.metrics if m.main]

    @property
    def gated_metrics(self) -> list[str]:
        return [m.name for m in self.metrics if m.gated]

    @property
    def headline_metrics(self) -> list[Metric]:
        """What a run's console shows: the main and the gated metrics."""
        return [m for m in self.metrics if m.main or m.gated]
