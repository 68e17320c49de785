"""Calibration: tuning a quantized configuration's parameters on text, block by block and end to end.

* :mod:`.settings`     what a run is asked to do: :class:`~.settings.CalibSettings`, presets,
  method names and their help;
* :mod:`.block`        one block's problem: its replicas tuned to match the float block's output
  (methods stats, grid, adam, ap), with the never-worse guard;
* :mod:`.loop`         the one block-by-block loop, over a weight source (the model in memory, or
  :mod:`dupstudio.core.streaming`'s file reads) and an activation store (in memory, or spilled
  to memory-mapped files);
* :mod:`.checkpoints`  each finished block written to a folder, read back to resume or to show;
* :mod:`.gptq`         a layer's integer codes by error feedback through its input Hessian;
* :mod:`.e2e`          every block's scales, biases and replica gains together against the
  full-precision model's next-token distribution (KL), codes fixed.

The entry point is :func:`dupstudio.core.calibrate.calibrate`. Nothing here imports
:mod:`dupstudio.core.calibrate`, :mod:`dupstudio.core.streaming` or the modules that use
calibration (:mod:`~dupstudio.core.sensitivity`, :mod:`~dupstudio.core.search`).
"""
