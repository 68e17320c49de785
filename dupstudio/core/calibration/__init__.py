"""Calibration methods that go beyond tuning scales over fixed codes.

* :mod:`.gptq` chooses a layer's integer codes by error feedback through its input Hessian;
* :mod:`.e2e` tunes every block's scales, biases and replica gains together against the
  full-precision model's next-token distribution (KL), codes fixed.

The block-wise loop that calls them is :func:`dupstudio.core.calibrate.calibrate`.
"""
