"""Triton Python-backend entry point for TIDE: binds `triton_python_backend_utils` and hands off.

All logic lives in `tide_trt.serving.triton_model` (tested without Triton); see its docstring for the
configuration (`TIDE_CONFIG` env or the `tide_config` parameter) and the input/output contract.
"""

import triton_python_backend_utils as pb_utils

from tide_trt.serving.triton_model import TideTritonModel


class TritonPythonModel(TideTritonModel):
    pb = pb_utils
