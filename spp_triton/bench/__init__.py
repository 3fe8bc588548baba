"""Kernel measurement tools, importable so that thin CLIs in ``tools/`` can run them.

* the kernel benchmark (``spp-triton-bench``, ``tools/benchmark_kernels.py``): ``cases`` (sweep
  configuration, inputs, implementations, bytes floor), ``harness`` (timing, checks, the sweep;
  its timer also times the head comparison's poolers), ``report`` (metadata, GPU targets,
  markdown, plots), ``kernels`` (the command line over them).

* ``spp_triton.bench.sass``: the static SASS report (registers, occupancy, hot-loop instruction
  mix and instructions per loaded element), compiled for sm_90 / sm_80 without a GPU, with
  torchvision's ``roi_pool`` kernels side by side.

Nothing is imported here: ``sass`` compiles in subprocesses and must not import Triton's kernels
into a process that runs Triton's interpreter.
"""
