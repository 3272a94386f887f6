"""Kits by kind of task: what tasks of one kind share, so that a task module holds only what is
its own (data layout, label encoding, classes, pipelines, metric choices, footnote).

* ``dense``: image -> per-pixel map on mmsegmentation (runner parts, the evaluator that writes and
  scores stored predictions, folder scoring, registration);
* ``segmentation``: the dense kit for semantic segmentation (label maps, mIoU, ConvNeXt / UperNet);
* ``depth``: the dense kit for monocular depth (millimetre PNGs, Eigen metrics, ConvNeXt / DPT,
  silog / berHu).

The task scan does not import this package; task modules import the kit they build on.
"""
