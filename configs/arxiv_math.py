"""The paper's long-context LM on Arxiv-math (Table 2): the PG19 model and training (configs/pg19.py),
reading a directory of LaTeX sources instead of PG19.

    python train.py --config configs/arxiv_math.py:rule=linear --config.data.data_dir=/data/arxiv_math \
        --config.data.tokenizer=/path/to/spm32k.model --workdir ...

data_dir holds train/validation/test subfolders (or a flat folder) of .tex files. Same args as pg19.py.
"""

import importlib.util
from pathlib import Path


def _pg19():
    # configs/ is not a package: load the sibling file (works from any working directory).
    spec = importlib.util.spec_from_file_location("_infini_configs_pg19", Path(__file__).with_name("pg19.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    config = _pg19().get_config(arg)
    with config.unlocked():
        config.data.name = "text"
        config.data.extensions = (".tex",)  # DirectorySource reads only these files
    return config
