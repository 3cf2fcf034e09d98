"""Write the local assets of the example recipes: a tiny random-init model + tokenizer and a dataset.

    python examples/recipes/make_assets.py examples/recipes/assets

creates ``assets/model`` (``model_name_or_path``) and ``assets/data`` (``dataset_name``, a
``save_to_disk`` DatasetDict with train/test splits of the synthetic 4-task suite). Nothing is
downloaded. See docs/recipes.md.
"""

from __future__ import annotations

import argparse
import json

from balancedmix.recipes import write_tiny_assets

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="examples/recipes/assets", help="output folder (default: examples/recipes/assets)")
    parser.add_argument("--train-per-task", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(write_tiny_assets(args.out, n_train_per_task=args.train_per_task, seed=args.seed)))
