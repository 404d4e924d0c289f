"""The command-line tools: `infini-train` (train.py) and `infini-eval` (eval.py); the top-level train.py and
eval.py of a checkout are thin wrappers of these modules."""
