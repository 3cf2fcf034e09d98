"""balancedmix benchmarks: overhead, anchors, step-cost floor, scaling, GRPO and DDP rows.

Run ``python -m benchmarks run [--suite cpu|gpu|all] [--out DIR]`` from the repository root.
"""
