"""The largest exact (float64) parameter gradient of tests/test_precision.py's long causal cases,
per attention type, against the largest float16 and bfloat16 numbers. Run from the repository root:

    PYTHONPATH=.:tests python docs/runs/2026-11-29_half_precision_gradients/measure.py
"""
import torch
from test_precision import attention, case_inputs, run

from gpam_fairseq.options import ATTENTION_TYPES

print(f"fp16 max {torch.finfo(torch.float16).max:,.0f}, bf16 max {torch.finfo(torch.bfloat16).max:.4g}")
print("| case | attention type | parameter | largest exact |gradient| | beyond fp16 |")
print("| --- | --- | --- | ---: | --- |")
for case in ("long_causal_1024", "long_causal_2048"):
    for attention_type in ATTENTION_TYPES:
        module = attention("dec_self", attention_type).double()
        _, inputs, _ = case_inputs(case, module)
        inputs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
        _, input_grads, grads = run(module, inputs)
        name, grad = max(grads.items(), key=lambda item: float(item[1].abs().max()))
        largest = float(grad.abs().max())
        per_token = max(float(g.abs().max()) for g in input_grads)
        print(f"| {case} | {attention_type} | {name} | {largest:,.0f} | "
              f"{'yes' if largest > torch.finfo(torch.float16).max else 'no'} (largest input gradient {per_token:,.0f}) |")
