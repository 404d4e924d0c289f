"""The paper's long-context LM on Arxiv-math (Table 2): the PG19 model and training (pg19.py),
reading a directory of LaTeX sources instead of PG19.

    infini-train --config arxiv_math:rule=linear --config.data.data_dir=/data/arxiv_math \
        --config.data.tokenizer=/path/to/spm32k.model --workdir ...

data_dir holds train/validation/test subfolders (or a flat folder) of .tex files. Same args as pg19.py.
"""

from infini_jax.configs import pg19


def get_config(arg=None):
    config = pg19.get_config(arg)
    config.data.name = "text"
    config.data.extensions = (".tex",)  # DirectorySource reads only these files
    return config
