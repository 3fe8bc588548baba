"""Command-line entry points (``pyproject.toml`` ``[project.scripts]``); ``tools/*.py`` call them.

* ``spp-triton-train`` (:mod:`spp_triton.cli.train`, ``tools/train_net.py``): train / evaluate a
  detectron2 detector from a config.
* ``spp-triton-compare`` (:mod:`spp_triton.cli.compare`, ``tools/compare_heads.py``): train,
  evaluate and compare ROI heads; write a report.
* ``spp-triton-bench`` (:mod:`spp_triton.cli.bench`, ``tools/benchmark_kernels.py``): kernel
  benchmarks against torchvision, detectron2 and PyTorch.
"""
